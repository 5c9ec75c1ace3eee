"""The incidents' read-only report pages in the admin (``opsconsole.admin_site`` routes them):
the recovery objectives report and the lessons-learned log with its CSV export. Thin: a form
parses the filters, ``selectors`` read, the templates render."""

from __future__ import annotations

import csv
import datetime as dt

from django import forms
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone

from incidents import selectors
from incidents.charts import Point, as_minutes, format_minutes, strip_chart
from incidents.models import ActionItem, Incident, Scenario, Severity
from opsconsole.spreadsheets import spreadsheet_safe

VIEW_PERMISSION = "incidents.view_incident"

PHASE_LABELS = {
    "detect": "Time to detect",
    "mitigate": "Time to mitigate",
    "recover": "Time to recover",
}


def date_field(label: str) -> forms.DateField:
    return forms.DateField(
        label=label,
        required=False,
        input_formats=["%Y-%m-%d"],
        widget=forms.DateInput(attrs={"type": "date"}, format="%Y-%m-%d"),
        error_messages={"invalid": "Enter a date as YYYY-MM-DD, e.g. 2026-03-01."},
    )


class DateRangeMixin:
    """``since`` and ``until``: whole days in UTC, both included."""

    def clean(self):
        cleaned = super().clean()
        since, until = cleaned.get("since"), cleaned.get("until")
        if since and until and since > until:
            raise ValidationError(f"The range starts ({since}) after it ends ({until}).")
        return cleaned

    def bounds(self) -> tuple[dt.datetime | None, dt.datetime | None]:
        """The range as instants: from the start of ``since`` to the end of ``until``."""
        since, until = self.cleaned_data.get("since"), self.cleaned_data.get("until")
        return (
            dt.datetime.combine(since, dt.time.min, dt.UTC) if since else None,
            dt.datetime.combine(until + dt.timedelta(days=1), dt.time.min, dt.UTC)
            if until
            else None,
        )


class ObjectivesFilterForm(DateRangeMixin, forms.Form):
    scenario = forms.ChoiceField(required=False, choices=[("", "All scenarios"), *Scenario.choices])
    since = date_field("Opened from (UTC)")
    until = date_field("Opened until (UTC, included)")


class LessonsFilterForm(DateRangeMixin, forms.Form):
    scenario = forms.ChoiceField(required=False, choices=[("", "All scenarios"), *Scenario.choices])
    severity = forms.ChoiceField(
        required=False, choices=[("", "All severities"), *Severity.choices]
    )
    since = date_field("Closed from (UTC)")
    until = date_field("Closed until (UTC, included)")
    q = forms.CharField(
        label="Search",
        required=False,
        help_text="Words to find in the title, root cause, prevention measures or process "
        "improvements (all of them must appear).",
    )

    def filters(self) -> dict:
        """``selectors.lessons_learned``'s arguments."""
        closed_since, closed_until = self.bounds()
        return {
            "scenario": self.cleaned_data["scenario"],
            "severity": self.cleaned_data["severity"],
            "closed_since": closed_since,
            "closed_until": closed_until,
            "search": self.cleaned_data["q"],
        }


def require_view_permission(request) -> None:
    if not request.user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied


def page_context(request, site, title: str, form: forms.Form) -> dict:
    return {
        **site.each_context(request),
        "opts": Incident._meta,
        "title": title,
        "form": form,
    }


def objectives_report(request, site):
    require_view_permission(request)
    form = ObjectivesFilterForm(request.GET)
    scenarios = None
    if form.is_valid():
        since, until = form.bounds()
        report = selectors.objectives_report(
            scenario=form.cleaned_data["scenario"] or None, since=since, until=until
        )
        scenarios = [
            {
                "value": figures.scenario,
                "label": figures.label,
                "incidents": figures.incidents,
                "phases": [phase_row(figures, phase) for phase in figures.phases],
            }
            for figures in report
        ]
    context = page_context(request, site, "Recovery objectives report", form)
    context["scenarios"] = scenarios
    return TemplateResponse(request, "admin/incidents/reports/objectives.html", context)


def share_text(met: int, of: int) -> str:
    return f"{met} of {of} ({met / of:.0%})" if of else "-"


def phase_row(scenario: selectors.ScenarioFigures, figures: selectors.PhaseFigures) -> dict:
    label = PHASE_LABELS[figures.phase]
    objectives = [as_minutes(o) for o in figures.objectives]
    points = [
        Point(
            minutes=as_minutes(m.elapsed),
            label=f"#{m.incident_id} {m.title}: {format_minutes(as_minutes(m.elapsed))} min, "
            f"{m.verdict}",
            met=None if m.verdict == selectors.UNKNOWN else m.verdict == selectors.MET,
        )
        for m in figures.measurements
    ]
    chart = None
    if points:
        chart = strip_chart(
            chart_id=f"chart-{scenario.scenario}-{figures.phase}",
            title=f"{scenario.label}: {label.lower()} in minutes",
            points=points,
            median=as_minutes(figures.median),
            p90=as_minutes(figures.p90),
            objectives=objectives,
        )
    return {
        "name": figures.phase,
        "label": label,
        "objectives": ", ".join(format_minutes(o) for o in objectives) or "none",
        "measured": figures.measured,
        "median": format_minutes(as_minutes(figures.median)),
        "p90": format_minutes(as_minutes(figures.p90)),
        "met": share_text(figures.met, figures.with_objective),
        "pending": figures.pending,
        "overdue": figures.overdue,
        "unmeasurable": figures.unmeasurable,
        "chart": chart,
    }


# Only these become links: a "javascript:" one would run in the reader's session.
WEB_LINKS = ("https://", "http://")


def action_item_text(item: ActionItem) -> str:
    return (
        f"{item.get_kind_display()}: {item.title} ({item.owner_name}, {item.get_status_display()})"
    )


def lessons_learned(request, site):
    require_view_permission(request)
    form = LessonsFilterForm(request.GET)
    context = page_context(request, site, "Lessons-learned log", form)
    if not form.is_valid():
        # A CSV request with bad filters gets the page, with the errors where it can show them.
        return TemplateResponse(request, "admin/incidents/reports/lessons.html", context)
    lessons = selectors.lessons_learned(**form.filters())
    if request.GET.get("format") == "csv":
        return lessons_csv(lessons)
    csv_query = request.GET.copy()
    csv_query["format"] = "csv"
    context["csv_query"] = csv_query.urlencode()
    context["rows"] = [
        {
            "lesson": lesson,
            "time_to_recovery": format_minutes(as_minutes(lesson.time_to_recovery)),
            "objective": format_minutes(as_minutes(lesson.recovery.objective)),
            "action_items": [
                (action_item_text(item), item.link if item.link.startswith(WEB_LINKS) else "")
                for item in lesson.action_items
            ],
        }
        for lesson in lessons
    ]
    return TemplateResponse(request, "admin/incidents/reports/lessons.html", context)


CSV_HEADER = [
    "incident",
    "title",
    "scenario",
    "severity",
    "started (UTC)",
    "closed (UTC)",
    "time to recovery (min)",
    "recovery objective (min)",
    "recovery objective result",
    "root cause",
    "actions taken",
    "prevention measures",
    "process improvements",
    "action items",
]


def csv_time(moment: dt.datetime | None) -> str:
    return f"{moment.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S}" if moment else ""


def csv_minutes(duration: dt.timedelta | None) -> str:
    return "" if duration is None else format_minutes(as_minutes(duration))


def lessons_csv(lessons: list[selectors.Lesson]) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    filename = f"lessons-learned-{timezone.now():%Y%m%d}.csv"
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    writer = csv.writer(response)
    writer.writerow(CSV_HEADER)
    for lesson in lessons:
        incident = lesson.incident
        row = [
            incident.pk,
            incident.title,
            incident.get_scenario_display(),
            incident.get_severity_display(),
            csv_time(lesson.started_at),
            csv_time(lesson.closed_at),
            csv_minutes(lesson.time_to_recovery),
            csv_minutes(lesson.recovery.objective),
            lesson.recovery.verdict,
            incident.root_cause,
            incident.resolution,
            incident.prevention,
            incident.process_improvements,
            "; ".join(action_item_text(item) for item in lesson.action_items),
        ]
        writer.writerow([spreadsheet_safe(value) for value in row])
    return response
