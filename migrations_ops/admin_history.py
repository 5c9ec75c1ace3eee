"""Row-level history in the admin: an object's "History" page lists the audit events about it
(``selectors.history_of``) with each changed field before → after, instead of Django's
LogEntry, which the console's services do not write and which no one could trust."""

from __future__ import annotations

from django.contrib.admin.utils import unquote
from django.core.exceptions import FieldDoesNotExist, PermissionDenied
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import urlencode
from django.utils.text import capfirst

from migrations_ops import selectors


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
