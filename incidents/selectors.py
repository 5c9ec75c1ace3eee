"""Reads of incidents: how long each phase took, and whether it met its objective.

Every phase is measured from the start of impact, or from detection when the impact's start
is unknown (time to detect is then unknown). Taking exactly the objective meets it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.db.models import DateTimeField, ExpressionWrapper, F, Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from incidents.models import PHASES, Incident, TimelineEntry

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
    """Incidents with at least one objective breached (finished late, or overdue now)."""
    now = now or timezone.now()
    queryset = Incident.objects.all() if queryset is None else queryset
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
