"""Time to detect / mitigate / recover against the objectives copied at opening; taking exactly
the objective meets it, a second more breaches it, in Python and in SQL alike."""

import datetime as dt

import pytest

from incidents import selectors, services
from incidents.models import (
    CHECKLIST_KEYS,
    ActionItem,
    EntryKind,
    Incident,
    IncidentStatus,
    Scenario,
    TimelineEntry,
)
from tests.factories import IncidentFactory, TargetFactory

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


def test_postmortem_data_gathers_everything_in_order(commander):
    incident = services.open_incident(
        actor=commander,
        title="t",
        scenario=Scenario.MIGRATION_FAILURE,
        severity="sev2",
        targets=[TargetFactory(name="zeta"), TargetFactory(name="alpha")],
    )
    services.add_note(actor=commander, incident=incident, text="first")
    second = services.add_action_item(
        actor=commander, incident=incident, title="b", kind="detective", owner=commander.user
    )
    data = selectors.postmortem_data(incident, now=incident.opened_at)

    assert data.targets == ["alpha", "zeta"]
    assert [entry.kind for entry in data.timeline] == [
        EntryKind.OPENED,
        EntryKind.NOTE,
        EntryKind.ACTION_ITEM,
    ]
    assert [item.key for item in data.checklist] == CHECKLIST_KEYS
    assert data.action_items == [second]
    assert data.addenda == []
    assert [(r.phase, r.verdict) for r in data.objectives] == [
        ("detect", selectors.UNKNOWN),
        ("mitigate", selectors.PENDING),
        ("recover", selectors.PENDING),
    ]


# The objectives report and the lessons-learned log.

REPORT_NOW = START + dt.timedelta(days=1)


def report(scenario=Scenario.MIGRATION_FAILURE, **filters):
    """The report's figures for ``scenario``, by phase."""
    (figures,) = [
        f for f in selectors.objectives_report(now=REPORT_NOW, **filters) if f.scenario == scenario
    ]
    return {phase.phase: phase for phase in figures.phases}


def test_objectives_report_median_p90_and_share_met_on_a_known_set():
    # Minutes to mitigate (objective 5) and to recover (objective 30), from the impact's start.
    for mitigated, recovered in [(2, 20), (4, 40), (5, None), (6, None), (10, None), (None, None)]:
        incident(
            mitigated_at=START + mitigated * MINUTE if mitigated else None,
            recovered_at=START + recovered * MINUTE if recovered else None,
        )
    figures = report()

    detect = figures["detect"]  # every one detected after exactly the objective: met
    assert (detect.measured, detect.met, detect.with_objective) == (6, 6, 6)
    assert detect.median == detect.p90 == MINUTE

    mitigate = figures["mitigate"]
    assert [m.elapsed for m in mitigate.measurements] == [n * MINUTE for n in (2, 4, 5, 6, 10)]
    assert mitigate.median == 5 * MINUTE
    # 90 % of the way from the 1st to the 5th: 0.6 of the way from 6 to 10.
    assert mitigate.p90 == 8.4 * MINUTE
    assert (mitigate.met, mitigate.with_objective, mitigate.share_met) == (3, 5, 0.6)
    assert (mitigate.pending, mitigate.overdue) == (1, 1)
    assert mitigate.objectives == (5 * MINUTE,)

    recover = figures["recover"]  # the four not recovered are pending, not in the figures
    assert [m.elapsed for m in recover.measurements] == [20 * MINUTE, 40 * MINUTE]
    assert (recover.median, recover.p90) == (30 * MINUTE, 38 * MINUTE)
    assert (recover.met, recover.with_objective, recover.pending) == (1, 2, 4)
    assert [m.verdict for m in recover.measurements] == [selectors.MET, selectors.BREACHED]


@pytest.mark.parametrize(
    ("values", "p90"),
    [([7.0], 7.0), ([1, 2], 1.9), ([3, 1, 2], 2.8), (list(range(1, 11)), 9.1), ([5] * 4, 5)],
)
def test_percentile_90_interpolates_between_closest_ranks(values, p90):
    assert selectors.percentile_90(values) == pytest.approx(p90)


def test_objectives_report_measures_from_detection_without_an_impact_start():
    incident(impact_started_at=None, mitigated_at=START + 6 * MINUTE)
    figures = report()
    assert (figures["detect"].measured, figures["detect"].unmeasurable) == (0, 1)
    assert figures["detect"].median is None
    assert figures["detect"].share_met is None
    assert figures["mitigate"].median == 5 * MINUTE  # from detection at START + 1 minute
    assert figures["mitigate"].met == 1


def test_objectives_report_counts_an_incident_without_objective_but_not_in_share_met():
    incident(mitigate_objective=None, mitigated_at=START + 20 * MINUTE)
    incident(mitigated_at=START + 3 * MINUTE)
    mitigate = report()["mitigate"]
    assert mitigate.measured == 2
    assert mitigate.median == 11.5 * MINUTE
    assert (mitigate.met, mitigate.with_objective, mitigate.share_met) == (1, 1, 1.0)
    assert mitigate.objectives == (5 * MINUTE,)


def test_objectives_report_reads_in_one_query(django_assert_num_queries):
    for scenario in (Scenario.MIGRATION_FAILURE, Scenario.OTHER):
        for minutes in (3, 7):
            incident(scenario=scenario, mitigated_at=START + minutes * MINUTE)
    with django_assert_num_queries(1):
        figures = selectors.objectives_report(now=REPORT_NOW)
    assert [f.phases[1].median for f in figures] == [5 * MINUTE, 5 * MINUTE]


def test_objectives_report_filters_on_opening_date_and_scenario():
    march = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    april = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)
    incident(opened_at=march)
    incident(opened_at=april - SECOND)
    incident(opened_at=april)
    incident(opened_at=march - SECOND)
    incident(opened_at=march + dt.timedelta(days=9), scenario=Scenario.OTHER)
    incident(opened_at=march + dt.timedelta(days=14), scenario=Scenario.PRODUCTION_EMERGENCY)

    in_march = selectors.objectives_report(since=march, until=april, now=REPORT_NOW)
    # The runbook's scenarios in their order, then other; only those with incidents.
    assert [(f.scenario, f.incidents) for f in in_march] == [
        (Scenario.MIGRATION_FAILURE, 2),
        (Scenario.PRODUCTION_EMERGENCY, 1),
        (Scenario.OTHER, 1),
    ]
    only = selectors.objectives_report(scenario=Scenario.OTHER, now=REPORT_NOW)
    assert [(f.scenario, f.incidents) for f in only] == [(Scenario.OTHER, 1)]
    assert [f.incidents for f in selectors.objectives_report(since=april)] == [1]
    assert selectors.objectives_report(since=april + dt.timedelta(days=1)) == []


def closed(**kwargs):
    defaults = {
        "status": IncidentStatus.CLOSED,
        "mitigated_at": START + 5 * MINUTE,
        "recovered_at": START + 20 * MINUTE,
        "closed_at": START + dt.timedelta(days=2),
    }
    return incident(**{**defaults, **kwargs})


def action_item(for_incident, title, **kwargs):
    defaults = {"kind": "preventive", "owner_name": "dba", "created_by": "tests"}
    return ActionItem.objects.create(incident=for_incident, title=title, **{**defaults, **kwargs})


def test_lessons_learned_lists_closed_incidents_last_closed_first():
    earlier = closed(closed_at=START + dt.timedelta(days=2))
    later = closed(closed_at=START + dt.timedelta(days=5), recovered_at=START + 45 * MINUTE)
    incident(status=IncidentStatus.RESOLVED, recovered_at=START + 20 * MINUTE)
    action_item(later, "second", kind="detective")
    action_item(later, "first")  # created after, listed after: by creation

    lessons = selectors.lessons_learned()

    assert [lesson.incident for lesson in lessons] == [later, earlier]
    assert [lesson.closed_at for lesson in lessons] == [later.closed_at, earlier.closed_at]
    assert [lesson.time_to_recovery for lesson in lessons] == [45 * MINUTE, 20 * MINUTE]
    assert [lesson.recovery.verdict for lesson in lessons] == [selectors.BREACHED, selectors.MET]
    assert lessons[0].started_at == START
    assert [item.title for item in lessons[0].action_items] == ["second", "first"]
    assert lessons[1].action_items == []


def test_a_closed_incident_without_closed_at_dates_from_its_timeline_then_its_recovery():
    from_timeline = closed(closed_at=None)
    for at, after in [(START + MINUTE, "mitigating"), (START + dt.timedelta(days=3), "closed")]:
        TimelineEntry.objects.create(
            incident=from_timeline,
            occurred_at=at,
            kind=EntryKind.STATUS,
            text=f"Status: → {after}",
            actor_name="tests",
            details={"before": "detected", "after": after},
        )
    from_recovery = closed(closed_at=None, recovered_at=START + 25 * MINUTE)

    lessons = {lesson.incident: lesson for lesson in selectors.lessons_learned()}
    assert lessons[from_timeline].closed_at == START + dt.timedelta(days=3)
    assert lessons[from_recovery].closed_at == START + 25 * MINUTE
    since_day_two = selectors.lessons_learned(closed_since=START + dt.timedelta(days=2))
    assert [lesson.incident for lesson in since_day_two] == [from_timeline]


def test_lessons_learned_filters_on_scenario_severity_and_closed_dates():
    day = dt.timedelta(days=1)
    first = closed(closed_at=START + day, severity="sev1")
    second = closed(closed_at=START + 2 * day, scenario=Scenario.CONCURRENT_CONFLICT)
    third = closed(closed_at=START + 3 * day)

    def listed(**filters):
        return [lesson.incident for lesson in selectors.lessons_learned(**filters)]

    assert listed(scenario=Scenario.MIGRATION_FAILURE) == [third, first]
    assert listed(severity="sev1") == [first]
    assert listed(closed_since=START + 2 * day) == [third, second]
    assert listed(closed_until=START + 3 * day) == [second, first]  # until is excluded
    assert listed(closed_since=START + 2 * day, closed_until=START + 3 * day) == [second]
    assert listed(scenario=Scenario.OTHER) == []


@pytest.mark.parametrize("field", ["title", "root_cause", "prevention", "process_improvements"])
def test_lessons_learned_search_finds_every_word_in_any_text_field(field):
    match = closed(**{field: "Index built without CONCURRENTLY"})
    closed(title="another", summary="concurrently, but in the summary")

    def found(search):
        return [lesson.incident for lesson in selectors.lessons_learned(search=search)]

    assert found("concurrently") == [match]
    assert found("  index   Concurrently ") == [match]
    assert found("concurrently nowhere") == []


def test_lessons_learned_takes_two_queries_however_many_incidents(django_assert_num_queries):
    for n in range(4):
        closed_incident = closed(title=f"closed {n}")
        for kind in ("corrective", "preventive", "detective"):
            action_item(closed_incident, f"{kind} {n}", kind=kind)

    with django_assert_num_queries(2):
        lessons = selectors.lessons_learned()
        seen = [
            (lesson.time_to_recovery, lesson.started_at, [i.title for i in lesson.action_items])
            for lesson in lessons
        ]

    assert len(seen) == 4
    assert seen[0][2] == ["corrective 3", "preventive 3", "detective 3"]
