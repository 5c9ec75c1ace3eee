"""Time to detect / mitigate / recover against the objectives copied at opening; taking exactly
the objective meets it, a second more breaches it, in Python and in SQL alike."""

import datetime as dt

import pytest

from incidents import selectors
from incidents.models import Incident
from tests.factories import IncidentFactory

pytestmark = pytest.mark.django_db

START = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
SECOND = dt.timedelta(seconds=1)


def incident(**kwargs):
    defaults = {
        "impact_started_at": START,
        "detected_at": START + MINUTE,
        "detect_objective": MINUTE,
        "mitigate_objective": 5 * MINUTE,
        "recover_objective": 30 * MINUTE,
    }
    return IncidentFactory(**{**defaults, **kwargs})


def verdicts(row, now=START + dt.timedelta(hours=1)):
    return {r.phase: r.verdict for r in selectors.objective_results(row, now)}


def breaching(now):
    return set(selectors.incidents_breaching(now=now).values_list("pk", flat=True))


@pytest.mark.parametrize(
    ("phase", "ends", "objective"),
    [("detect", "detected_at", MINUTE), ("mitigate", "mitigated_at", 5 * MINUTE)],
)
def test_equal_to_the_objective_is_met_a_second_more_is_breached(phase, ends, objective):
    on_time = incident(**{ends: START + objective})
    late = incident(**{ends: START + objective + SECOND})
    now = START + 2 * objective
    assert verdicts(on_time, now)[phase] == selectors.MET
    assert verdicts(late, now)[phase] == selectors.BREACHED
    assert selectors.phase_result(on_time, phase, now).elapsed == objective
    assert late.pk in breaching(now)
    assert on_time.pk not in breaching(now)


def test_an_unfinished_phase_is_pending_until_its_deadline_then_breached():
    row = incident()  # detected on time, not yet mitigated
    at_deadline = START + 5 * MINUTE
    assert verdicts(row, at_deadline)["mitigate"] == selectors.PENDING
    assert row.pk not in breaching(at_deadline)
    assert verdicts(row, at_deadline + SECOND)["mitigate"] == selectors.BREACHED
    assert row.pk in breaching(at_deadline + SECOND)


def test_without_the_impact_start_phases_are_measured_from_detection():
    row = incident(
        impact_started_at=None,
        mitigated_at=START + MINUTE + 5 * MINUTE,
        recovered_at=START + MINUTE + 30 * MINUTE,
    )
    assert verdicts(row) == {
        "detect": selectors.UNKNOWN,
        "mitigate": selectors.MET,
        "recover": selectors.MET,
    }
    assert row.pk not in breaching(START + dt.timedelta(hours=1))


def test_no_objective_is_unknown_and_never_breached():
    row = incident(
        detect_objective=None,
        mitigate_objective=None,
        recover_objective=None,
        detected_at=START + dt.timedelta(hours=2),
    )
    assert set(verdicts(row, START + dt.timedelta(hours=3)).values()) == {selectors.UNKNOWN}
    assert row.pk not in breaching(START + dt.timedelta(hours=3))
    assert Incident.objects.count() == 1
