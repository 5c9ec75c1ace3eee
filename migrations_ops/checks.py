"""System checks: no ModelAdmin names an encrypted field where the admin would show or query
its plain text (a list column, a read-only field, a list filter's values, a search)."""

from __future__ import annotations

from django.core import checks

from migrations_ops.fields import EncryptedTextField

# ModelAdmin options whose field names the admin displays or queries as plain values.
SHOWN_OPTIONS = ("list_display", "list_display_links", "readonly_fields", "list_filter")
QUERIED_OPTIONS = ("search_fields", "sortable_by", "ordering")


def encrypted_field_names(model) -> set[str]:
    return {
        field.name for field in model._meta.get_fields() if isinstance(field, EncryptedTextField)
    }


def named(entries) -> set[str]:
    """The field names in an option's entries (a filter may be ``(name, FilterClass)``; a
    search or ordering ``^name``, ``-name``, ``name__icontains``)."""
    names = set()
    for entry in entries or ():
        entry = entry[0] if isinstance(entry, tuple | list) else entry
        if isinstance(entry, str):
            names.add(entry.lstrip("^=@-").split("__", 1)[0])
    return names


def secrets_shown_by(model_admin) -> list[checks.Error]:
    secret = encrypted_field_names(model_admin.model)
    errors = []
    for option in (*SHOWN_OPTIONS, *QUERIED_OPTIONS):
        for name in sorted(named(getattr(model_admin, option, ())) & secret):
            errors.append(
                checks.Error(
                    f"{type(model_admin).__name__}.{option} names the encrypted field "
                    f"{name!r}: the admin would show or query its plain text",
                    hint="Show a masked value instead (a display method such as masked_url).",
                    obj=type(model_admin),
                    id="migrations_ops.E001",
                )
            )
    return errors


@checks.register(checks.Tags.admin)
def no_secret_in_admin_options(app_configs=None, **kwargs) -> list[checks.Error]:
    from django.contrib import admin

    errors = []
    for model_admin in admin.site._registry.values():
        errors += secrets_shown_by(model_admin)
        for inline in model_admin.inlines:
            errors += secrets_shown_by(inline(model_admin.model, admin.site))
    return errors
