"""The console's roles: which permissions each group holds.

Groups are created and kept in step by migrations that call ``sync_roles``; the services check
the permissions themselves, so a role holds for every door.
"""

from __future__ import annotations

ON_CALL = "On-call engineer"
INCIDENT_COMMANDER = "Incident commander"
AUDITOR = "Auditor"
CONSOLE_ADMIN = "Console admin"

HISTORY_APPS = ("migrations_ops", "incidents")

ON_CALL_ACTIONS = [
    "migrations_ops.force_unlock_target",
    "migrations_ops.dry_run_migrations",
    "migrations_ops.verify_target",
    "migrations_ops.run_migrations",
    "migrations_ops.cleanup_target",
    "migrations_ops.fix_books",
    "migrations_ops.import_scripts",
    "migrations_ops.change_flags",
    "incidents.run_drill",
]

ADMIN_MODELS = [
    ("migrations_ops", "target"),
    ("migrations_ops", "alertthresholds"),
    ("migrations_ops", "apitoken"),
    ("incidents", "drill"),
    ("incidents", "escalationcontact"),
    ("auth", "user"),
    ("auth", "group"),
    # Two-factor authentication: console admins give people their TOTP devices.
    ("otp_totp", "totpdevice"),
]
# django-axes' records of logins: console admins see lock-outs and lift them (delete).
LOGIN_RECORD_MODELS = [
    ("axes", "accessattempt"),
    ("axes", "accesslog"),
    ("axes", "accessfailurelog"),
]
# The console's settings that live in its database: the sweeper's and drills' schedules.
SETTINGS_APPS = ("django_celery_beat",)


def _model_permission(permission, verbs: set[str]) -> bool:
    """One of Django's own permissions on a model (``change_target``), not a custom one that
    merely starts with the same word (``change_flags`` is an on-call kill switch)."""
    return permission.codename in {f"{verb}_{permission.content_type.model}" for verb in verbs}


def role_permissions(permissions) -> dict[str, set]:
    """``permissions``: Permission rows (with content_type). Returns role name → rows."""
    by_name = {f"{p.content_type.app_label}.{p.codename}": p for p in permissions}
    views = {p for p in permissions if p.codename.startswith("view_")}
    history_views = {p for p in views if p.content_type.app_label in HISTORY_APPS}
    on_call = history_views | {by_name[name] for name in ON_CALL_ACTIONS if name in by_name}
    incidents = {p for p in permissions if p.content_type.app_label == "incidents"}
    approve = {by_name[name] for name in ["migrations_ops.approve_operation"] if name in by_name}
    managed = {
        p
        for p in permissions
        if (
            (p.content_type.app_label, p.content_type.model) in ADMIN_MODELS
            or p.content_type.app_label in SETTINGS_APPS
        )
        and _model_permission(p, {"add", "change", "delete", "view"})
    }
    login_records = {
        p
        for p in permissions
        if (p.content_type.app_label, p.content_type.model) in LOGIN_RECORD_MODELS
        and _model_permission(p, {"delete", "view"})
    }
    return {
        AUDITOR: history_views,
        ON_CALL: on_call,
        INCIDENT_COMMANDER: on_call | approve | incidents,
        CONSOLE_ADMIN: managed | login_records | history_views,
    }


def sync_roles(apps) -> None:
    """Create the groups and give each exactly its role's permissions."""
    from django.contrib.auth.management import create_permissions

    for app_config in apps.get_app_configs():
        # Historical app configs have no models module; create_permissions skips those.
        models_module = getattr(app_config, "models_module", None)
        app_config.models_module = models_module or True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = models_module
    group_model = apps.get_model("auth", "Group")
    permission_model = apps.get_model("auth", "Permission")
    permissions = list(permission_model.objects.select_related("content_type"))
    for name, granted in role_permissions(permissions).items():
        group, _ = group_model.objects.get_or_create(name=name)
        group.permissions.set(granted)
