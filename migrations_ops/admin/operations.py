"""Operations in the admin: read-only pages, each with its audit trail and the approver's form."""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.urls import path, reverse

from migrations_ops import selectors, services
from migrations_ops.actors import Actor
from migrations_ops.admin.common import ReadOnlyAdmin, pretty_json
from migrations_ops.large_tables import LargeTableAdminMixin, period_filter, values_filter
from migrations_ops.models import Door, Operation, OperationStatus
from migrations_ops.refusals import refusal_recorded


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
