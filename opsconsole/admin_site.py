"""The console's admin site: Django's, with the on-call engineer's fleet view on its index."""

from __future__ import annotations

import re
from functools import wraps

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.http import Http404, HttpResponseRedirect
from django.urls import path
from django_otp import devices_for_user
from django_otp.admin import OTPAdminAuthenticationForm

from incidents import reports
from incidents import selectors as incident_selectors
from incidents.models import OPEN_STATUSES, Drill, DrillRun, Incident
from migrations_ops import selectors
from migrations_ops.models import Operation, Target
from opsconsole.security import otp_required_for


class OptionalOTPAuthenticationForm(OTPAdminAuthenticationForm):
    """The admin's login form while two-factor authentication is on: a TOTP token is asked of
    members of OTP_REQUIRED_GROUPS; everyone else logs in with a password alone."""

    def clean(self):
        # The password check of Django's admin form, without the token check that follows it.
        self.cleaned_data = super(OTPAdminAuthenticationForm, self).clean()
        user = self.get_user()
        if user is not None and otp_required_for(user):
            if not any(devices_for_user(user)):
                raise forms.ValidationError(
                    "Your account needs a two-factor device (TOTP) to use the admin: "
                    "ask a console admin to add one for you.",
                    code="no_device",
                )
            self.clean_otp(user)
        return self.cleaned_data

    def _chosen_device(self, user):
        # One device: no need to pick it (the page offers a choice only after a first try).
        device = super()._chosen_device(user)
        if device is None:
            devices = list(devices_for_user(user, for_verify=True))
            if len(devices) == 1:
                device = devices[0]
        return device


# Date-part lookups a changelist accepts from its query string (``created_at__year=2026``, the
# date drill-down's links), with the values a calendar holds. Years stop at 9998: the drill-down
# reads up to the next year, month or day, and no datetime follows 9999-12-31.
DATE_PART_RANGES = {
    "year": (1, 9998),
    "iso_year": (1, 9998),
    "quarter": (1, 4),
    "month": (1, 12),
    "week": (1, 53),
    "day": (1, 31),
    "week_day": (1, 7),
    "iso_week_day": (1, 7),
    "hour": (0, 23),
    "minute": (0, 59),
    "second": (0, 59),
}

SHORT_INTEGER = re.compile(r"-?[0-9]{1,6}")


def impossible_date_parts(query) -> list[str]:
    """The ``field__<part>=value`` parameters of ``query`` whose value no calendar holds, as
    ``name=value``: the ORM would fail on them only while building the SQL."""
    found = []
    for name, values in query.lists():
        bounds = DATE_PART_RANGES.get(name.rpartition("__")[2]) if "__" in name else None
        if bounds is None:
            continue
        for value in values:
            number = value.strip()
            if not SHORT_INTEGER.fullmatch(number) or not bounds[0] <= int(number) <= bounds[1]:
                found.append(f"{name}={value[:20]}")
    return found


def impossible_selection(model_admin, post) -> str | None:
    """The first id an admin action was posted for (``_selected_action``) that is no id the
    model can have (``abc`` for a number): Django's action would fail in its query."""
    if not isinstance(model_admin, admin.ModelAdmin) or "_selected_action" not in post:
        return None
    for value in post.getlist("_selected_action"):
        try:
            model_admin.model._meta.pk.to_python(value)
        except ValidationError:
            return value
    return None


def refusing_hostile_input(view):
    """An admin page asked for a date no calendar holds: back to the same page without that
    filter, saying so, instead of a failing query. An action posted for an id no row can have:
    nothing done, saying so. An object that does not exist is a 404, also in views of other
    apps that look it up with ``.get()`` (django-otp's device pages)."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if request.method == "POST":
            selected = impossible_selection(getattr(view, "__self__", None), request.POST)
            if selected is not None:
                messages.error(
                    request, f"Nothing done: {selected[:20]!r} is not the id of any row here."
                )
                return HttpResponseRedirect(request.get_full_path())
        elif found := impossible_date_parts(request.GET):
            query = request.GET.copy()
            for item in found:
                query.pop(item.partition("=")[0], None)
            messages.error(
                request,
                f"Ignored the date filter {', '.join(found)}: no such date on the calendar.",
            )
            return HttpResponseRedirect(f"{request.path}?{query.urlencode()}".rstrip("?"))
        try:
            return view(request, *args, **kwargs)
        except ObjectDoesNotExist:
            raise Http404("no such object") from None

    return wrapper


class OpsAdminSite(admin.AdminSite):
    """``admin.site`` (``opsconsole.apps.OpsAdminConfig``). The index shows, above the usual app
    list, every target's health (``selectors.fleet_overview``) to whoever may view targets,
    read-only users such as auditors included; nothing on it connects to a target.

    With OTP_REQUIRED_GROUPS set, their members use the admin only once verified by a TOTP
    device (django-otp): the login page asks for the token."""

    @property
    def login_form(self):
        return OptionalOTPAuthenticationForm if settings.OTP_REQUIRED_GROUPS else None

    @property
    def login_template(self):
        return "otp/admin111/login.html" if settings.OTP_REQUIRED_GROUPS else None

    def has_permission(self, request):
        user = request.user
        return super().has_permission(request) and (
            not otp_required_for(user) or user.is_verified()
        )

    def admin_view(self, view, cacheable=False):
        # Every admin page goes through here (ModelAdmin.get_urls wraps its views with it).
        return super().admin_view(refusing_hostile_input(view), cacheable)

    def index(self, request, extra_context=None):
        fleet = self.fleet_context(request)
        context = {"fleet": fleet} if fleet is not None else {}
        drills = self.drills_context(request)
        if drills is not None:
            context["drills"] = drills
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
            "workers": selectors.worker_liveness(),
            "can_view_operations": operation_admin is not None
            and operation_admin.has_view_permission(request),
            "can_view_incidents": incident_admin is not None
            and incident_admin.has_view_permission(request),
            "open_statuses": ",".join(OPEN_STATUSES),
        }

    def drills_context(self, request) -> dict | None:
        """Each drill: when it last ran, its result, whether it is overdue."""
        drill_admin = self._registry.get(Drill)
        if drill_admin is None or not drill_admin.has_view_permission(request):
            return None
        run_admin = self._registry.get(DrillRun)
        return {
            "states": incident_selectors.drill_states(),
            "can_view_runs": run_admin is not None and run_admin.has_view_permission(request),
        }
