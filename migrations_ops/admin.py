"""The admin door: thin, every write goes through ``services``."""

from __future__ import annotations

import json

from axes.admin import AccessAttemptAdmin
from axes.models import AccessAttempt
from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django_celery_beat.admin import PeriodicTaskAdmin
from django_celery_beat.models import PeriodicTask

from migrations_ops import admin_tokens, admin_users, selectors, services  # noqa: F401
from migrations_ops.actors import Actor
from migrations_ops.admin_flags import TargetFlagsMixin
from migrations_ops.admin_history import AuditHistoryMixin
from migrations_ops.admin_operations import (
    TARGET_ACTIONS,
    TargetOperationsMixin,
    error_with_link,
    make_action,
    verify_targets,
    warn_if_broker_down,
)
from migrations_ops.forms import ForceUnlockForm, TargetForm
from migrations_ops.large_tables import LargeTableAdminMixin, period_filter, values_filter
from migrations_ops.models import (
    TARGET_SETTINGS,
    AlertThresholds,
    AuditEvent,
    Door,
    FlagChange,
    LockState,
    MigrationScript,
    Operation,
    OperationStatus,
    Target,
)

# admin_tokens registers the API tokens' admin; admin_users the users' and groups'.
from migrations_ops.refusals import invalid_form_recorded, refusal_recorded

admin.site.site_header = "opsconsole"
admin.site.site_title = "opsconsole"
admin.site.index_title = "Operations console"

LOCK_COLOURS = {
    LockState.FREE: "#2e7d32",
    LockState.HELD: "#b26a00",
    LockState.STALE: "#c62828",
    LockState.UNKNOWN: "#666",
}


def pretty_json(value) -> str:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, sort_keys=True, default=str))


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


class ReadOnlyAdmin(admin.ModelAdmin):
    """History is never edited through the admin."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Operation)
class OperationAdmin(LargeTableAdminMixin, ReadOnlyAdmin):
    list_display = [
        "id",
        "kind",
        "target",
        "status",
        "requested_by_name",
        "door",
        "requested_at",
        "duration",
    ]
    # Millions of rows (large_tables.py): no DISTINCT behind a filter, no scan behind the
    # search, sorting only where an index gives the order (models.py has them all).
    list_filter = [
        period_filter("requested_at", "requested"),
        "status",
        "kind",
        "door",
        "target",
        values_filter("requested_by_name", "requester", "requester"),
    ]
    search_fields = ["requested_by_name", "target__name"]  # see LargeTableAdminMixin
    search_columns = ("requested_by_name",)
    search_related = (("target", "name"),)
    search_numbers = ("id",)
    search_help_text = "Part of a requester's or a target's name, or an operation number."
    sortable_by = ["id", "requested_at"]
    list_select_related = ["target"]
    change_form_template = "admin/migrations_ops/operation/change_form.html"
    fields = [
        "kind",
        "target",
        "incident",
        "status",
        "requested_by_name",
        "door",
        "reason",
        "requested_at",
        "started_at",
        "finished_at",
        "duration",
        "worker",
        "approved_by_name",
        "decided_at",
        "decision_reason",
        "error",
        "result_display",
        "params_display",
        "log",
    ]
    readonly_fields = fields

    @admin.display(description="Result (before / after)")
    def result_display(self, obj):
        return pretty_json(obj.result)

    @admin.display(description="Parameters")
    def params_display(self, obj):
        return pretty_json(obj.params)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        # As Django's own change view: an id that is no operation's (or no number) is a message.
        operation = self.get_object(request, unquote(object_id))
        if operation is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        extra_context = {
            **(extra_context or {}),
            # Not while awaiting approval: a reload would wipe the approver's half-typed reason.
            "auto_refresh": operation.status in (OperationStatus.QUEUED, OperationStatus.RUNNING),
            "audit_events": selectors.audit_events_for_operation(operation),
            "target_url": reverse("admin:migrations_ops_target_change", args=[operation.target_id]),
            "can_decide": operation.status == OperationStatus.AWAITING_APPROVAL
            and request.user.has_perm(services.APPROVE_PERMISSION),
            "decide_url": reverse("admin:migrations_ops_operation_decide", args=[operation.pk]),
        }
        return super().change_view(request, object_id, form_url, extra_context)

    def get_urls(self):
        return [
            path(
                "<int:operation_id>/decide/",
                self.admin_site.admin_view(self.decide_view),
                name="migrations_ops_operation_decide",
            ),
            *super().get_urls(),
        ]

    def decide_view(self, request, operation_id: int):
        """Approve or reject (POST only); the service refuses anyone deciding their own."""
        if request.method != "POST":
            return redirect("admin:migrations_ops_operation_change", operation_id)
        if not request.user.has_perm(services.APPROVE_PERMISSION):
            raise PermissionDenied
        operation = get_object_or_404(Operation, pk=operation_id)
        approving = request.POST.get("decision") == "approve"
        decide = services.approve_operation if approving else services.reject_operation
        try:
            decide(
                actor=Actor.for_user(request.user, Door.ADMIN),
                operation=operation,
                reason=request.POST.get("reason", ""),
            )
        except services.ServiceError as error:
            refusal_recorded(request, "approve" if approving else "reject", error)
            self.message_user(request, str(error), messages.ERROR)
        else:
            verb = "approved" if approving else "rejected"
            self.message_user(request, f"Operation #{operation.pk} {verb}.", messages.SUCCESS)
        return redirect("admin:migrations_ops_operation_change", operation_id)


@admin.register(AuditEvent)
class AuditEventAdmin(LargeTableAdminMixin, ReadOnlyAdmin):
    list_display = ["created_at", "actor_name", "door", "action", "target_name", "operation_id"]
    # As for operations above.
    # The date drill-down is period_filter (large_tables.py): date_hierarchy's SELECT DISTINCT
    # over every row would not hold at millions of rows.
    list_filter = [
        period_filter("created_at", "created"),
        "door",
        values_filter("action", "action", "kind"),
        values_filter("target_name", "target", "target"),
        values_filter("actor_name", "user", "user"),
    ]
    search_fields = ["actor_name", "target_name", "action"]  # see LargeTableAdminMixin
    search_columns = ("actor_name", "target_name", "action")
    search_numbers = ("operation",)
    search_help_text = (
        "Part of an actor's or target's name or of an action, or an operation number."
    )
    sortable_by = ["created_at"]
    fields = [
        "created_at",
        "actor_name",
        "door",
        "action",
        "target_name",
        "operation",
        "ip",
        "request_id",
        "object_display",
        "changes_display",
        "details_display",
        "previous_hash",
        "hash",
    ]
    readonly_fields = fields

    @admin.display(description="Details")
    def details_display(self, obj):
        return pretty_json(obj.details)

    @admin.display(description="About")
    def object_display(self, obj):
        if not obj.object_model:
            return "-"
        return f"{obj.object_model} #{obj.object_id}"

    @admin.display(description="Before → after")
    def changes_display(self, obj):
        changes = selectors.field_changes(obj)
        if not changes:
            return "-"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((name, json.dumps(before), json.dumps(after)) for name, before, after in changes),
        )
        return format_html(
            "<table><thead><tr><th>Field</th><th>Before</th><th>After</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )

    def get_urls(self):
        return [
            path(
                "export/",
                self.admin_site.admin_view(self.export_view),
                name="migrations_ops_auditevent_export",
            ),
            *super().get_urls(),
        ]

    def export_view(self, request):
        """The changelist's rows as CSV, with the same filters and search (the link carries
        the changelist's query string), streamed: any number of rows in constant memory."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            queryset = self.get_changelist_instance(request).get_queryset(request)
        except IncorrectLookupParameters:
            self.message_user(request, "Unknown filter: nothing exported.", messages.ERROR)
            return redirect("admin:migrations_ops_auditevent_changelist")
        filters = {key: request.GET.get(key) for key in sorted(request.GET)}
        services.record_history_export(
            actor=Actor.for_user(request.user, Door.ADMIN), filters=filters
        )
        response = StreamingHttpResponse(
            selectors.audit_events_csv(queryset), content_type="text/csv; charset=utf-8"
        )
        stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
        response["Content-Disposition"] = f'attachment; filename="audit-events-{stamp}.csv"'
        return response


@admin.register(MigrationScript)
class MigrationScriptAdmin(ReadOnlyAdmin):
    """Scripts change only through ``ops import``, which keeps applied SQL from being replaced."""

    list_display = [
        "target",
        "version",
        "filename",
        "layout",
        "transactional",
        "short_checksum",
        "drift",
        "imported_at",
    ]
    list_filter = ["target", "layout", "transactional"]
    search_fields = ["filename", "target__name"]
    list_select_related = ["target"]
    fields = [
        "target",
        "version",
        "name",
        "filename",
        "layout",
        "transactional",
        "needs_no_transaction",
        "checksum",
        "imported_at",
        "drift_checksum",
        "drift_detected_at",
        "up_sql",
        "down_sql",
    ]
    readonly_fields = fields

    @admin.display(description="Checksum")
    def short_checksum(self, obj):
        return obj.checksum[:12]

    @admin.display(description="Drift", boolean=True)
    def drift(self, obj):
        return bool(obj.drift_checksum)


@admin.register(AlertThresholds)
class AlertThresholdsAdmin(admin.ModelAdmin):
    """One row: the thresholds the fleet view applies. Changes are audited."""

    list_display = ["__str__", "updated_at"]
    fields = ["lock_held_seconds", "failure_rate", "retry_rate"]

    def has_add_permission(self, request):
        return super().has_add_permission(request) and not AlertThresholds.objects.exists()

    def has_delete_permission(self, request, obj=None):
        return False

    def get_changeform_initial_data(self, request):
        current = selectors.AlertThresholds.from_settings()
        return {
            "lock_held_seconds": current.lock_held_seconds,
            "failure_rate": current.failure_rate,
            "retry_rate": current.retry_rate,
        }

    def save_model(self, request, obj, form, change):
        services.save_alert_thresholds(
            actor=Actor.for_user(request.user, Door.ADMIN),
            thresholds=obj,
            changed=form.changed_data,
        )


@admin.register(FlagChange)
class FlagChangeAdmin(ReadOnlyAdmin):
    """The flag history for auditors: every change, whichever door it came through."""

    list_display = ["changed_at", "target", "kind", "actor_name", "door", "old_to_new", "reason"]
    list_filter = ["kind", "door", "target"]
    search_fields = ["actor_name", "target__name", "reason"]
    list_select_related = ["target"]
    fields = [
        "changed_at",
        "target",
        "kind",
        "actor_name",
        "door",
        "reason",
        "old_to_new",
        "stage_before",
        "stage_after",
        "before_display",
        "after_display",
    ]
    readonly_fields = fields

    @admin.display(description="Old → new")
    def old_to_new(self, obj):
        return selectors.describe_flag_change(obj)

    @admin.display(description="Before")
    def before_display(self, obj):
        return pretty_json(obj.before)

    @admin.display(description="After")
    def after_display(self, obj):
        return pretty_json(obj.after)


class LoginAttemptAdmin(AccessAttemptAdmin):
    """django-axes' lock-outs, whose "Clean up expired attempts" deletes login records: only
    for those who may delete them (django-axes asks no permission for it)."""

    @admin.action(description="Clean up expired attempts", permissions=["delete"])
    def cleanup_expired_attempts(self, request, queryset):
        # django-axes stamps the attempt time on login requests only; "now" for this one.
        request.axes_attempt_time = getattr(request, "axes_attempt_time", None)
        return super().cleanup_expired_attempts(request, queryset)


admin.site.unregister(AccessAttempt)
admin.site.register(AccessAttempt, LoginAttemptAdmin)


class ScheduleAdmin(PeriodicTaskAdmin):
    """django-celery-beat's periodic tasks (the sweeper, the drills): its actions change or run
    them, so they need the change permission (django-celery-beat asks none)."""

    @admin.action(description="Enable selected tasks", permissions=["change"])
    def enable_tasks(self, request, queryset):
        return super().enable_tasks(request, queryset)

    @admin.action(description="Disable selected tasks", permissions=["change"])
    def disable_tasks(self, request, queryset):
        return super().disable_tasks(request, queryset)

    @admin.action(description="Toggle activity of selected tasks", permissions=["change"])
    def toggle_tasks(self, request, queryset):
        return super().toggle_tasks(request, queryset)

    @admin.action(description="Run selected tasks", permissions=["change"])
    def run_tasks(self, request, queryset):
        return super().run_tasks(request, queryset)


admin.site.unregister(PeriodicTask)
admin.site.register(PeriodicTask, ScheduleAdmin)
