"""API tokens in the admin: made by the services, shown once, revoked, never edited or deleted.

Created through ``services.create_api_token`` (the token is shown once, on the page answering
the form, and kept nowhere), revoked with an action, never edited or deleted (a revoked token
stays listed, for the record)."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.template.response import TemplateResponse

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import ApiToken, Door, Target
from migrations_ops.refusals import refusal_recorded


class ApiTokenForm(forms.ModelForm):
    targets = forms.ModelMultipleChoiceField(
        queryset=Target.objects.order_by("name"),
        widget=admin.widgets.FilteredSelectMultiple("targets", is_stacked=False),
        help_text="The targets the application may read (at least one).",
    )

    class Meta:
        model = ApiToken
        fields = ["name", "targets"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "prefix",
        "targets_column",
        "created_at",
        "created_by_name",
        "last_used_at",
        "revoked_column",
    ]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "prefix"]
    actions = ["revoke"]
    readonly_fields = [
        "name",
        "prefix",
        "targets_column",
        "created_at",
        "created_by_name",
        "last_used_at",
        "revoked_at",
        "revoked_by_name",
    ]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("targets")

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = ApiTokenForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request, obj=None):
        return ["name", "targets"] if obj is None else self.readonly_fields

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.readonly_fields

    def has_change_permission(self, request, obj=None):
        # A token is never edited (its page is read-only); the changelist's revoke action
        # needs the change permission, which it asks without an object.
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request, obj=None):
        return False  # revoke instead: the record of who could read what stays

    @admin.display(description="Targets")
    def targets_column(self, obj):
        return ", ".join(target.name for target in obj.targets.all())

    @admin.display(description="Revoked")
    def revoked_column(self, obj):
        if obj.revoked_at is None:
            return "—"
        return f"{obj.revoked_at:%Y-%m-%d %H:%M} by {obj.revoked_by_name}"

    def save_model(self, request, obj, form, change):
        token, raw = services.create_api_token(
            actor=Actor.for_user(request.user, Door.ADMIN),
            name=form.cleaned_data["name"],
            targets=form.cleaned_data["targets"],
        )
        obj.pk = token.pk  # the admin logs and links the row the service made
        obj.prefix = token.prefix
        request.new_api_token = (token, raw)

    def save_related(self, request, form, formsets, change):
        """The service has set the targets."""

    def response_add(self, request, obj, post_url_continue=None):
        token, raw = request.new_api_token
        response = TemplateResponse(
            request,
            "admin/migrations_ops/apitoken/created.html",
            {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "title": f"API token for {token.name}",
                "token": token,
                "raw_token": raw,
                "target_names": [target.name for target in token.targets.order_by("name")],
            },
        )
        response["Cache-Control"] = "no-store"  # the one page holding the token
        return response

    @admin.action(description="Revoke selected API tokens", permissions=["change"])
    def revoke(self, request, queryset):
        actor = Actor.for_user(request.user, Door.ADMIN)
        revoked = []
        for token in queryset.order_by("name", "prefix"):
            try:
                services.revoke_api_token(actor=actor, token=token)
            except services.ServiceError as error:
                refusal_recorded(request, "revoke_api_token", error, subject=token)
                self.message_user(request, str(error), messages.ERROR)
            else:
                revoked.append(f"{token.name} ({token.prefix})")
        if revoked:
            self.message_user(
                request, f"Revoked: {', '.join(revoked)}. They are refused from now on."
            )
