"""The console's admin site: Django's, with the on-call engineer's fleet view on its index."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from incidents import reports
from incidents.models import OPEN_STATUSES, Incident
from migrations_ops import selectors
from migrations_ops.models import Operation, Target


class OpsAdminSite(admin.AdminSite):
    """``admin.site`` (``opsconsole.apps.OpsAdminConfig``). The index shows, above the usual app
    list, every target's health (``selectors.fleet_overview``) to whoever may view targets,
    read-only users such as auditors included; nothing on it connects to a target."""

    def index(self, request, extra_context=None):
        fleet = self.fleet_context(request)
        context = {"fleet": fleet} if fleet is not None else {}
        return super().index(request, {**context, **(extra_context or {})})

    def get_urls(self):
        # Ahead of the site's own: its catch-all would take these paths.
        report_urls = [
            path(
                "incidents/reports/objectives/",
                self.admin_view(reports.objectives_report),
                {"site": self},
                name="incidents_objectives_report",
            ),
            path(
                "incidents/reports/lessons/",
                self.admin_view(reports.lessons_learned),
                {"site": self},
                name="incidents_lessons_learned",
            ),
        ]
        return [*report_urls, *super().get_urls()]

    def fleet_context(self, request) -> dict | None:
        target_admin = self._registry.get(Target)
        if target_admin is None or not target_admin.has_view_permission(request):
            return None
        operation_admin = self._registry.get(Operation)
        incident_admin = self._registry.get(Incident)
        thresholds = selectors.AlertThresholds.current()
        rows = selectors.fleet_overview(thresholds=thresholds)
        observed = [row for row in rows if row["observed_at"] is not None]
        return {
            "rows": rows,
            "thresholds": thresholds,
            "window_hours": int(selectors.FLEET_WINDOW.total_seconds() // 3600),
            "oldest_observation": min(observed, key=lambda row: row["observed_at"], default=None),
            "never_observed": [row["name"] for row in rows if row["observed_at"] is None],
            "can_view_operations": operation_admin is not None
            and operation_admin.has_view_permission(request),
            "can_view_incidents": incident_admin is not None
            and incident_admin.has_view_permission(request),
            "open_statuses": ",".join(OPEN_STATUSES),
        }
