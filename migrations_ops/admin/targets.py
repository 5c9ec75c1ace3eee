"""Targets in the admin: ``TargetAdmin``, its force-unlock page, and (in mixins) the operations'
and the flags' pages; each write handed to ``services``."""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.utils.html import format_html

from migrations_ops import selectors, services
from migrations_ops.actors import Actor
from migrations_ops.admin.history import AuditHistoryMixin
from migrations_ops.admin.target_flags import TargetFlagsMixin
from migrations_ops.admin.target_operations import (
    TARGET_ACTIONS,
    TargetOperationsMixin,
    error_with_link,
    make_action,
    verify_targets,
    warn_if_broker_down,
)
from migrations_ops.forms import ForceUnlockForm, TargetForm
from migrations_ops.models import TARGET_SETTINGS, Door, LockState, Target
from migrations_ops.refusals import invalid_form_recorded, refusal_recorded

LOCK_COLOURS = {
    LockState.FREE: "#2e7d32",
    LockState.HELD: "#b26a00",
    LockState.STALE: "#c62828",
    LockState.UNKNOWN: "#666",
}


@admin.register(Target)
class TargetAdmin(AuditHistoryMixin, TargetFlagsMixin, TargetOperationsMixin, admin.ModelAdmin):
    form = TargetForm
    list_display = ["name", "environment", "convention", "lock_column", "observed_column"]
    list_filter = ["environment", "convention"]
    search_fields = ["name"]
    list_select_related = ["lock_observation"]
    readonly_fields = ["masked_url", "lock_column", "flags_column", "created_at", "updated_at"]
    actions = [
        "emergency_disable",
        "force_unlock",
        "refresh_status",
        verify_targets,
        *(make_action(action) for action in TARGET_ACTIONS),
    ]

    def get_fields(self, request, obj=None):
        fields = list(TARGET_SETTINGS)
        if obj is not None:
            # The URL is a write-only input: a user who may not change the target would get
            # it rendered read-only, so they see the masked row alone.
            if not self.has_change_permission(request, obj):
                fields.remove("connection_url")
            fields[3:3] = ["masked_url"]
            # The flags change only on their own page (the services keep their history).
            fields += ["flags_column", "lock_column", "created_at", "updated_at"]
        return fields

    @admin.display(description="Connection (masked)")
    def masked_url(self, obj):
        return obj.masked_url

    @admin.display(description="Lock")
    def lock_column(self, obj):
        report = selectors.lock_report(obj)
        return format_html(
            '<span style="color:{};font-weight:bold">{}</span>',
            LOCK_COLOURS[report["state"]],
            selectors.describe_lock(report),
        )

    @admin.display(description="Lock observed")
    def observed_column(self, obj):
        observation = selectors.observation_of(obj)
        if observation is None or observation.observed_at is None:
            return "never"
        seconds = (timezone.now() - observation.observed_at).total_seconds()
        return f"{selectors.humanize_seconds(seconds)} ago"

    def save_model(self, request, obj, form, change):
        services.save_target(
            actor=Actor.for_user(request.user, Door.ADMIN),
            target=obj,
            changed_fields=form.changed_data,
        )

    # --- force-unlock ------------------------------------------------------------------------
    def has_force_unlock_permission(self, request):
        return request.user.has_perm(services.FORCE_UNLOCK_PERMISSION)

    def has_verify_permission(self, request):
        return request.user.has_perm("migrations_ops.verify_target")

    def has_run_migrations_permission(self, request):
        return request.user.has_perm("migrations_ops.run_migrations")

    def has_dry_run_migrations_permission(self, request):
        return request.user.has_perm("migrations_ops.dry_run_migrations")

    def has_cleanup_target_permission(self, request):
        return request.user.has_perm("migrations_ops.cleanup_target")

    def has_fix_books_permission(self, request):
        return request.user.has_perm("migrations_ops.fix_books")

    @admin.action(description="Force-release migration lock", permissions=["force_unlock"])
    def force_unlock(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(
                request, "Select exactly one target to release its lock.", messages.ERROR
            )
            return None
        return redirect("admin:migrations_ops_target_force_unlock", queryset.get().pk)

    # Reading a target is left to those who may verify it: an auditor's pages never reach out.
    @admin.action(description="Refresh lock status (read the targets now)", permissions=["verify"])
    def refresh_status(self, request, queryset):
        for target in queryset:
            status = services.read_target_status(target, include_applied=False)
            if status.error:
                self.message_user(request, f"{target.name}: {status.error}", messages.ERROR)
        self.message_user(request, f"Read {queryset.count()} target(s).", messages.INFO)

    def get_urls(self):
        return [
            path(
                "<int:target_id>/force-unlock/",
                self.admin_site.admin_view(self.force_unlock_view),
                name="migrations_ops_target_force_unlock",
            ),
            *self.get_operation_urls(),
            *self.get_flag_urls(),
            *super().get_urls(),
        ]

    def force_unlock_view(self, request, target_id: int):
        if not self.has_force_unlock_permission(request):
            raise PermissionDenied
        target = get_object_or_404(Target, pk=target_id)
        form = ForceUnlockForm(request.POST if request.method == "POST" else None, target=target)
        if request.method == "POST" and form.is_valid():
            try:
                operation = services.request_force_unlock(
                    actor=Actor.for_user(request.user, Door.ADMIN),
                    target=target,
                    reason=form.cleaned_data["reason"],
                    release_fresh=form.cleaned_data["release_fresh"],
                    confirm_name=form.cleaned_data.get("confirm_name"),
                    incident=form.cleaned_data["incident"],
                )
            except services.ServiceError as error:
                refusal_recorded(request, "force_unlock", error, target=target)
                form.add_error(None, error_with_link(error))
            else:
                self.message_user(
                    request,
                    f"Operation #{operation.pk} requested: release the lock of {target.name}.",
                    messages.SUCCESS,
                )
                warn_if_broker_down(self, request, operation)
                return redirect("admin:migrations_ops_operation_change", operation.pk)
        elif request.method == "POST":
            invalid_form_recorded(request, "force_unlock", form, target=target)
        status = services.read_target_status(target, include_applied=False)
        report = selectors.lock_report(target)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Force-release the migration lock of {target.name}",
            "target": target,
            "form": form,
            "status_error": status.error,
            "lock": report,
            "lock_text": selectors.describe_lock(report),
            "lock_colour": LOCK_COLOURS[report["state"]],
        }
        return TemplateResponse(request, "admin/migrations_ops/target/force_unlock.html", context)
