"""History in the admin: the audit events (browsed, exported as CSV), the flag changes, and
each object's "History" page.

An object's History page lists the audit events about it (``selectors.history_of``) with each
changed field before → after, instead of Django's LogEntry, which the console's services do not
write and which no one could trust."""

from __future__ import annotations

import json

from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.utils import unquote
from django.core.exceptions import FieldDoesNotExist, PermissionDenied
from django.http import StreamingHttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.text import capfirst

from migrations_ops import selectors, services
from migrations_ops.actors import Actor
from migrations_ops.admin.common import ReadOnlyAdmin, pretty_json
from migrations_ops.large_tables import LargeTableAdminMixin, period_filter, values_filter
from migrations_ops.models import AuditEvent, Door, FlagChange


def shown_value(model, name: str, value):
    """A stored value as people read it: a choice's label (``SEV2``), "none" for nothing."""
    if value is None or value == "":
        return "none"
    try:
        field = model._meta.get_field(name)
    except FieldDoesNotExist:  # a flag's runbook name, a copied name: shown as recorded
        field = None
    if field is not None and field.choices:
        return dict(field.flatchoices).get(value, value)
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "none"
    return value


def history_rows(model, events) -> list[dict]:
    return [
        {
            "event": event,
            "changes": [
                (name, shown_value(model, name, before), shown_value(model, name, after))
                for name, before, after in selectors.field_changes(event)
            ],
        }
        for event in events
    ]


class AuditHistoryMixin:
    """For a ModelAdmin whose objects' changes go through services that write audit events
    with ``subject=`` the object."""

    history_limit = 200

    def history_view(self, request, object_id, extra_context=None):
        model = self.model
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            return self._get_obj_does_not_exist_redirect(request, model._meta, object_id)
        if not self.has_view_or_change_permission(request, obj):
            raise PermissionDenied
        events = selectors.history_of(obj, limit=self.history_limit)
        browser = None
        if request.user.has_perm("migrations_ops.view_auditevent"):
            browser = reverse("admin:migrations_ops_auditevent_changelist")
            if model._meta.label_lower == "migrations_ops.target":
                browser += "?" + urlencode({"target": obj.name})
        context = {
            **self.admin_site.each_context(request),
            "title": f"History: {obj}",
            "subtitle": None,
            "object": obj,
            "opts": model._meta,
            "module_name": str(capfirst(model._meta.verbose_name_plural)),
            "app_label": model._meta.app_label,
            "rows": history_rows(model, events),
            "limit": self.history_limit,
            "truncated": len(events) >= self.history_limit,
            "browser_url": browser,
            **(extra_context or {}),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/audit_history.html", context)


@admin.register(AuditEvent)
class AuditEventAdmin(LargeTableAdminMixin, ReadOnlyAdmin):
    list_display = ["created_at", "actor_name", "door", "action", "target_name", "operation_id"]
    # As for operations (operations.py).
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
