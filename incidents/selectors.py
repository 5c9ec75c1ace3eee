"""Reads of incidents: how long each phase took, and whether it met its objective.

Every phase is measured from the start of impact, or from detection when the impact's start
is unknown (time to detect is then unknown). Taking exactly the objective meets it.
"""

from __future__ import annotations

import datetime as dt
import statistics
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.db.models import (
    DateTimeField,
    Exists,
    ExpressionWrapper,
    F,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

from incidents.models import (
    CHANGE_PERMISSION,
    OPEN_STATUSES,
    PHASES,
    ActionItem,
    Drill,
    DrillRun,
    DrillRunStatus,
    EntryKind,
    Incident,
    IncidentStatus,
    Scenario,
    TimelineEntry,
)
from migrations_ops.models import Operation

MET = "met"
BREACHED = "breached"
PENDING = "pending"  # not over yet, and still within the objective
UNKNOWN = "unknown"  # no objective, or no start to measure from


@dataclass(frozen=True)
class PhaseResult:
    phase: str  # detect, mitigate, recover
    elapsed: dt.timedelta | None  # so far, while the phase is not over
    objective: dt.timedelta | None
    verdict: str


def phase_start(incident: Incident, phase: str) -> dt.datetime | None:
    if phase == "detect":
        return incident.impact_started_at
    return incident.impact_started_at or incident.detected_at


def phase_result(incident: Incident, phase: str, now: dt.datetime | None = None) -> PhaseResult:
    start = phase_start(incident, phase)
    end = getattr(incident, f"{PHASES[phase]}_at")
    objective = incident.objective(phase)
    if start is None:
        return PhaseResult(phase, None, objective, UNKNOWN)
    elapsed = (end or now or timezone.now()) - start
    if objective is None:
        verdict = UNKNOWN
    elif elapsed > objective:
        verdict = BREACHED
    else:
        verdict = MET if end is not None else PENDING
    return PhaseResult(phase, elapsed, objective, verdict)


def objective_results(incident: Incident, now: dt.datetime | None = None) -> list[PhaseResult]:
    now = now or timezone.now()
    return [phase_result(incident, phase, now) for phase in PHASES]


def incidents_breaching(
    queryset: QuerySet[Incident] | None = None, now: dt.datetime | None = None
) -> QuerySet[Incident]:
    """Incidents with at least one objective breached (finished late, or overdue now); the
    real ones (drills left out) unless ``queryset`` says otherwise."""
    now = now or timezone.now()
    queryset = Incident.objects.filter(is_drill=False) if queryset is None else queryset
    annotations = {}
    condition = Q()
    for phase, ends in PHASES.items():
        start = (
            F("impact_started_at")
            if phase == "detect"
            else Coalesce("impact_started_at", "detected_at")
        )
        name = f"_deadline_{phase}"
        annotations[name] = ExpressionWrapper(
            start + F(f"{phase}_objective"), output_field=DateTimeField()
        )
        condition |= Q(**{f"{ends}_at__gt": F(name)}) | (
            Q(**{f"{ends}_at__isnull": True}) & Q(**{f"{name}__lt": now})
        )
    return queryset.annotate(**annotations).filter(condition)


def timeline(incident: Incident) -> QuerySet[TimelineEntry]:
    return incident.timeline.select_related("corrects").order_by("occurred_at", "id")


def postmortem_data(incident: Incident, now: dt.datetime | None = None):
    """Everything the Markdown post-mortem shows (``incidents.postmortem``), read once."""
    from incidents.postmortem import PostmortemData

    return PostmortemData(
        incident=incident,
        targets=list(incident.affected_targets.order_by("name").values_list("name", flat=True)),
        timeline=list(timeline(incident)),
        checklist=list(incident.checklist.order_by("id")),
        action_items=list(incident.action_items.order_by("id")),
        addenda=list(incident.addenda.order_by("added_at", "id")),
        objectives=objective_results(incident, now),
    )


# The objectives report and the lessons-learned log. Both compute in Python over one query of
# the columns they need: incidents number in the hundreds, not millions, and ``phase_result``
# stays the one definition of a phase's duration and verdict, shared with the incident's page.

# What phase_result reads, plus what the report groups and labels by.
REPORT_COLUMNS = (
    "id",
    "title",
    "scenario",
    "opened_at",
    "impact_started_at",
    "detected_at",
    "mitigated_at",
    "recovered_at",
    "detect_objective",
    "mitigate_objective",
    "recover_objective",
)


@dataclass(frozen=True)
class Measurement:
    """One incident's finished phase: a point on the report's chart."""

    incident_id: int
    title: str
    elapsed: dt.timedelta
    objective: dt.timedelta | None
    verdict: str  # MET, BREACHED, or UNKNOWN when the incident copied no objective


@dataclass(frozen=True)
class PhaseFigures:
    phase: str
    measurements: list[Measurement]  # finished phases, oldest incident first
    pending: int  # not over yet: left out of every other figure
    overdue: int  # of those pending, already past their objective
    unmeasurable: int  # no start to measure from (time to detect without an impact start)
    median: dt.timedelta | None
    p90: dt.timedelta | None
    met: int
    with_objective: int  # finished phases that had an objective: share met's denominator
    objectives: tuple[dt.timedelta, ...]  # distinct ones copied; several if they were edited

    @property
    def measured(self) -> int:
        return len(self.measurements)

    @property
    def share_met(self) -> float | None:
        return self.met / self.with_objective if self.with_objective else None


@dataclass(frozen=True)
class ScenarioFigures:
    scenario: str
    label: str
    incidents: int
    phases: list[PhaseFigures]


def percentile_90(values: list[float]) -> float:
    """The 90th percentile interpolated linearly between the closest ranks, as
    ``statistics.quantiles(method="inclusive")`` (spreadsheets' PERCENTILE.INC) computes it:
    of 1..10 it is 9.1, of 1 and 2 it is 1.9, of a single value that value."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def phase_figures(incidents: list[Incident], phase: str, now: dt.datetime) -> PhaseFigures:
    measurements = []
    pending = overdue = unmeasurable = 0
    for incident in incidents:
        result = phase_result(incident, phase, now)
        if result.elapsed is None:
            unmeasurable += 1
        elif getattr(incident, f"{PHASES[phase]}_at") is None:
            pending += 1
            overdue += result.verdict == BREACHED
        else:
            measurements.append(
                Measurement(
                    incident.pk, incident.title, result.elapsed, result.objective, result.verdict
                )
            )
    seconds = [m.elapsed.total_seconds() for m in measurements]
    judged = [m for m in measurements if m.objective is not None]
    return PhaseFigures(
        phase=phase,
        measurements=measurements,
        pending=pending,
        overdue=overdue,
        unmeasurable=unmeasurable,
        median=dt.timedelta(seconds=statistics.median(seconds)) if seconds else None,
        p90=dt.timedelta(seconds=percentile_90(seconds)) if seconds else None,
        met=sum(m.verdict == MET for m in judged),
        with_objective=len(judged),
        objectives=tuple(sorted({i.objective(phase) for i in incidents} - {None})),
    )


def objectives_report(
    scenario: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> list[ScenarioFigures]:
    """Per scenario with incidents (in ``Scenario`` order) and per phase: how many finished
    phases were measured, their median and 90th percentile (``percentile_90``), the share that
    met the objective the incident copied, and each duration for the chart.

    Incidents count by when they were opened, ``since`` ≤ ``opened_at`` < ``until``: unlike the
    detected time it is always set and never corrected. A phase not over yet is counted as
    pending and left out of the figures."""
    now = now or timezone.now()
    # Real incidents only: a drill is scored on its own run (DrillRun.met_objectives).
    incidents = (
        Incident.objects.filter(is_drill=False).only(*REPORT_COLUMNS).order_by("opened_at", "id")
    )
    if scenario:
        incidents = incidents.filter(scenario=scenario)
    if since is not None:
        incidents = incidents.filter(opened_at__gte=since)
    if until is not None:
        incidents = incidents.filter(opened_at__lt=until)
    by_scenario: dict[str, list[Incident]] = {}
    for incident in incidents:
        by_scenario.setdefault(incident.scenario, []).append(incident)
    return [
        ScenarioFigures(
            scenario=value,
            label=label,
            incidents=len(by_scenario[value]),
            phases=[phase_figures(by_scenario[value], phase, now) for phase in PHASES],
        )
        for value, label in Scenario.choices
        if value in by_scenario
    ]


@dataclass(frozen=True)
class Lesson:
    """One closed incident in the lessons-learned log."""

    incident: Incident  # with its action items prefetched
    closed_at: dt.datetime
    recovery: PhaseResult

    @property
    def started_at(self) -> dt.datetime:
        # Where every phase but detection is measured from.
        return phase_start(self.incident, "recover") or self.incident.opened_at

    @property
    def time_to_recovery(self) -> dt.timedelta | None:
        return self.recovery.elapsed if self.incident.recovered_at else None

    @property
    def action_items(self) -> list[ActionItem]:
        return list(self.incident.action_items.all())


def closed_incidents() -> QuerySet[Incident]:
    """Closed incidents, each with ``closed_on``: its ``closed_at``; for one closed before the
    console kept that, when its timeline says it closed; failing both, its recovered time."""
    closing = (
        TimelineEntry.objects.filter(
            incident=OuterRef("pk"),
            kind=EntryKind.STATUS,
            details__after=IncidentStatus.CLOSED,
        )
        .order_by("occurred_at", "id")
        .values("occurred_at")[:1]
    )
    return Incident.objects.filter(status=IncidentStatus.CLOSED).annotate(
        closed_on=Coalesce("closed_at", Subquery(closing), "recovered_at", "opened_at")
    )


def lessons_learned(
    *,
    scenario: str = "",
    severity: str = "",
    closed_since: dt.datetime | None = None,
    closed_until: dt.datetime | None = None,
    search: str = "",
) -> list[Lesson]:
    """Closed incidents, last closed first, with their action items: two queries however many
    there are. ``closed_since`` ≤ closed < ``closed_until``; every word of ``search`` must be
    in the title, root cause, prevention measures or process improvements."""
    incidents = (
        closed_incidents()
        .filter(is_drill=False)  # a drill's lessons are on its DrillRun
        .prefetch_related(Prefetch("action_items", queryset=ActionItem.objects.order_by("id")))
    )
    if scenario:
        incidents = incidents.filter(scenario=scenario)
    if severity:
        incidents = incidents.filter(severity=severity)
    if closed_since is not None:
        incidents = incidents.filter(closed_on__gte=closed_since)
    if closed_until is not None:
        incidents = incidents.filter(closed_on__lt=closed_until)
    for word in search.split():
        incidents = incidents.filter(
            Q(title__icontains=word)
            | Q(root_cause__icontains=word)
            | Q(prevention__icontains=word)
            | Q(process_improvements__icontains=word)
        )
    return [
        Lesson(incident, incident.closed_on, phase_result(incident, "recover"))
        for incident in incidents.order_by("-closed_on", "-id")
    ]


def incidents_to_serve(target) -> list[Incident]:
    """The incidents an operation on ``target`` may serve: every one not closed, those with the
    target among their affected ones first (``affects_target``), newest first. Drill
    incidents are served by their drill's own operations only."""
    affecting = Incident.affected_targets.through.objects.filter(
        incident=OuterRef("pk"), target=target
    )
    return list(
        Incident.objects.exclude(status=IncidentStatus.CLOSED)
        .filter(is_drill=False)
        .annotate(affects_target=Exists(affecting))
        .order_by("-affects_target", "-opened_at", "-id")
    )


# --- people ----------------------------------------------------------------------------
def active_users():
    return get_user_model().objects.filter(is_active=True).order_by("username")


def commanders():
    """Active users who may change incidents (directly, through a group, or superusers)."""
    app_label, codename = CHANGE_PERMISSION.split(".")
    permission = Permission.objects.filter(content_type__app_label=app_label, codename=codename)
    return (
        active_users()
        .filter(
            Q(is_superuser=True)
            | Q(user_permissions__in=permission)
            | Q(groups__permissions__in=permission)
        )
        .distinct()
    )


def incidents_to_note(operation: Operation) -> list[Incident]:
    """The incidents an operation lands on: the one it serves (unless closed) and every open
    real incident with its target among the affected ones, each once. A drill incident gets
    only the operations that serve it (its drill's own)."""
    if operation.incident_id is None and not _open_incident_affects(operation.target_id):
        # As most of the time: one plain query, instead of the ORM compiling a 40-column
        # query with a subquery (longer than PostgreSQL takes to run it), twice per operation.
        return []
    affecting = Incident.affected_targets.through.objects.filter(
        target_id=operation.target_id
    ).values("incident_id")
    return list(
        Incident.objects.filter(
            Q(status__in=OPEN_STATUSES, is_drill=False, pk__in=affecting)
            | Q(pk=operation.incident_id)
        )
        .exclude(status=IncidentStatus.CLOSED)
        .order_by("pk")
    )


def open_incidents_affecting(target) -> list[Incident]:
    """The open incidents with ``target`` among their affected ones: where its flag changes
    are noted."""
    return list(
        Incident.objects.filter(status__in=OPEN_STATUSES, affected_targets=target).order_by("pk")
    )


def _open_incident_affects(target_id: int) -> bool:
    """Whether any open real incident (drills aside) lists the target among the affected
    ones."""
    quote = connection.ops.quote_name
    links = Incident.affected_targets.through._meta
    incidents = Incident._meta
    link_incident = quote(links.get_field("incident").column)
    link_target = quote(links.get_field("target").column)
    status = quote(incidents.get_field("status").column)
    is_drill = quote(incidents.get_field("is_drill").column)
    marks = ", ".join(["%s"] * len(OPEN_STATUSES))
    query = (
        f"SELECT 1 FROM {quote(links.db_table)} link"  # noqa: S608 (names from the models)
        f" JOIN {quote(incidents.db_table)} incident"
        f" ON incident.{quote(incidents.pk.column)} = link.{link_incident}"
        f" WHERE link.{link_target} = %s AND incident.{status} IN ({marks})"
        f" AND incident.{is_drill} = %s LIMIT 1"
    )
    with connection.cursor() as cursor:
        cursor.execute(query, [target_id, *(str(status) for status in OPEN_STATUSES), False])
        return cursor.fetchone() is not None


# --- drills ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DrillState:
    """A drill as the dashboard shows it."""

    drill: Drill
    last_run: DrillRun | None
    last_success: DrillRun | None
    overdue: bool
    due_since: dt.datetime | None  # when it fell due (None: never succeeded, so always)


def drill_states(now: dt.datetime | None = None) -> list[DrillState]:
    """Every drill with its last run and whether it is overdue: never run successfully, or
    its last success is older than its interval (DRILL_INTERVALS). Three queries."""
    now = now or timezone.now()
    drills = list(Drill.objects.select_related("target", "periodic_task__crontab"))
    newest = DrillRun.objects.filter(drill=OuterRef("pk")).order_by("-started_at", "-id")
    ids = Drill.objects.filter(pk__in=[d.pk for d in drills]).annotate(
        last_run_id=Subquery(newest.values("pk")[:1]),
        last_success_id=Subquery(newest.filter(status=DrillRunStatus.SUCCEEDED).values("pk")[:1]),
    )
    last = {row.pk: (row.last_run_id, row.last_success_id) for row in ids}
    runs = DrillRun.objects.select_related("incident").in_bulk(
        [run_id for pair in last.values() for run_id in pair if run_id]
    )
    states = []
    for drill in drills:
        last_run_id, last_success_id = last.get(drill.pk, (None, None))
        success = runs.get(last_success_id)
        succeeded_at = (success.finished_at or success.started_at) if success else None
        due_since = succeeded_at + drill.interval if succeeded_at else None
        states.append(
            DrillState(
                drill=drill,
                last_run=runs.get(last_run_id),
                last_success=success,
                overdue=due_since is None or due_since < now,
                due_since=due_since,
            )
        )
    return states


def drill_state(drill: Drill, now: dt.datetime | None = None) -> DrillState:
    return next(state for state in drill_states(now) if state.drill.pk == drill.pk)
