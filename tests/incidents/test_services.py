"""Incidents through the service layer: the order of statuses and timestamps, the objectives
copied at opening, escalation, notes and corrections."""

import datetime as dt

import pytest
from django.utils import timezone

from incidents import services
from incidents.models import (
    CHECKLIST_KEYS,
    ActionItemKind,
    ActionItemStatus,
    ChecklistKey,
    CheckResult,
    EntryKind,
    EscalationContact,
    IncidentStatus,
    RecoveryObjective,
    Scenario,
)
from migrations_ops.actors import Actor
from migrations_ops.models import Door
from migrations_ops.services import InvalidRequest, PermissionDenied
from tests.factories import TargetFactory, UserFactory

pytestmark = pytest.mark.django_db


def open_one(commander, scenario=Scenario.MIGRATION_FAILURE, **kwargs):
    return services.open_incident(
        actor=commander, title="rollback failed", scenario=scenario, severity="sev1", **kwargs
    )


def kinds(incident):
    return list(incident.timeline.order_by("id").values_list("kind", flat=True))


def test_open_copies_the_objectives_and_starts_the_timeline(commander):
    target = TargetFactory()
    incident = open_one(commander, targets=[target], culprit_migration="042_add_index.sql")

    assert incident.status == IncidentStatus.DETECTED
    assert incident.commander == commander.user
    assert incident.commander_name == "commander"
    assert list(incident.affected_targets.all()) == [target]
    assert incident.detected_at == incident.opened_at
    assert (incident.detected_by, incident.detected_auto) == ("commander", True)
    assert incident.detect_objective == dt.timedelta(minutes=1)
    assert incident.mitigate_objective == dt.timedelta(minutes=5)
    assert incident.recover_objective == dt.timedelta(minutes=30)
    assert kinds(incident) == [EntryKind.OPENED]


def test_editing_an_objective_later_changes_no_open_incident(commander):
    incident = open_one(commander)
    objective = RecoveryObjective.objects.get(scenario=Scenario.MIGRATION_FAILURE)
    objective.recover_within = dt.timedelta(hours=4)
    objective.save()

    incident.refresh_from_db()
    assert incident.recover_objective == dt.timedelta(minutes=30)
    assert open_one(commander).recover_objective == dt.timedelta(hours=4)


def test_other_scenario_has_no_objectives(commander):
    incident = open_one(commander, scenario=Scenario.OTHER)
    assert incident.detect_objective is None
    assert incident.recover_objective is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("title", " ", "an incident needs a title"),
        ("scenario", "meteor", "unknown scenario 'meteor'"),
        ("severity", "sev9", "unknown severity 'sev9'"),
    ],
)
def test_open_refuses_bad_input(commander, field, value, message):
    kwargs = {"title": "t", "scenario": Scenario.OTHER, "severity": "sev2", field: value}
    with pytest.raises(InvalidRequest, match=message):
        services.open_incident(actor=commander, **kwargs)


def test_open_needs_permission():
    viewer = Actor.for_user(UserFactory(), Door.ADMIN)
    with pytest.raises(PermissionDenied, match="not allowed to open incidents"):
        open_one(viewer)


def test_status_moves_forward_only(commander):
    incident = open_one(commander)
    incident = services.change_status(
        actor=commander, incident=incident, status=IncidentStatus.MITIGATING
    )
    for status in (IncidentStatus.MITIGATING, IncidentStatus.DETECTED):
        with pytest.raises(InvalidRequest, match="it can only move forward"):
            services.change_status(actor=commander, incident=incident, status=status)
    incident.refresh_from_db()
    assert incident.status == IncidentStatus.MITIGATING
    assert kinds(incident) == [EntryKind.OPENED, EntryKind.STATUS]


def test_monitoring_and_resolved_set_mitigated_and_recovered_by_themselves(commander):
    incident = open_one(commander)
    incident = services.change_status(
        actor=commander, incident=incident, status=IncidentStatus.MONITORING
    )
    assert incident.mitigated_auto is True
    assert incident.recovered_at is None
    mitigated_at = incident.mitigated_at
    incident = services.change_status(
        actor=commander, incident=incident, status=IncidentStatus.RESOLVED
    )
    assert incident.mitigated_at == mitigated_at  # already set: left alone
    assert incident.recovered_at >= mitigated_at
    assert (incident.recovered_by, incident.recovered_auto) == ("commander", True)
    assert kinds(incident) == [
        EntryKind.OPENED,
        EntryKind.STATUS,
        EntryKind.TIMESTAMP,
        EntryKind.STATUS,
        EntryKind.TIMESTAMP,
    ]


def test_unknown_status_is_refused(commander):
    with pytest.raises(InvalidRequest, match="unknown status 'done'"):
        services.change_status(actor=commander, incident=open_one(commander), status="done")


def test_timestamps_must_be_in_chronological_order(commander):
    detected = timezone.now() - dt.timedelta(minutes=10)
    incident = services.set_timestamp(
        actor=commander, incident=open_one(commander), name="detected", when=detected
    )
    with pytest.raises(InvalidRequest, match=r"impact started \(.* UTC\) cannot be after detected"):
        services.set_timestamp(
            actor=commander,
            incident=incident,
            name="impact_started",
            when=detected + dt.timedelta(seconds=1),
        )
    with pytest.raises(InvalidRequest, match=r"mitigated .* cannot be before detected"):
        services.set_timestamp(
            actor=commander,
            incident=incident,
            name="mitigated",
            when=detected - dt.timedelta(seconds=1),
        )
    # Equal is in order.
    incident = services.set_timestamp(
        actor=commander, incident=incident, name="impact_started", when=detected
    )
    assert (incident.impact_started_at, incident.impact_started_auto) == (detected, False)
    assert kinds(incident) == [EntryKind.OPENED, EntryKind.TIMESTAMP, EntryKind.TIMESTAMP]


def test_timestamps_cannot_be_in_the_future_or_naive(commander):
    incident = open_one(commander)
    with pytest.raises(InvalidRequest, match="recovered cannot be in the future"):
        services.set_timestamp(
            actor=commander,
            incident=incident,
            name="recovered",
            when=timezone.now() + dt.timedelta(minutes=5),
        )
    with pytest.raises(InvalidRequest, match="needs a date, a time and a time zone"):
        services.set_timestamp(
            actor=commander, incident=incident, name="recovered", when=dt.datetime(2026, 1, 1)
        )


def test_correcting_a_timestamp_keeps_what_it_was_on_the_timeline(commander):
    incident = open_one(commander)
    earlier = incident.detected_at - dt.timedelta(minutes=3)
    incident = services.set_timestamp(
        actor=commander, incident=incident, name="detected", when=earlier
    )
    entry = incident.timeline.get(kind=EntryKind.TIMESTAMP)
    assert "(was " in entry.text
    assert entry.details["after"] == earlier.isoformat()
    assert incident.detected_auto is False


def test_escalation_is_recorded_with_its_reason(commander):
    incident = open_one(commander)
    incident = services.escalate(
        actor=commander, incident=incident, level=3, reason="replica lag on every node"
    )
    assert incident.escalation_level == 3
    entry = incident.timeline.get(kind=EntryKind.ESCALATION)
    assert entry.text.startswith("Escalated to Level 3: platform team")
    with pytest.raises(InvalidRequest, match="already at level 3"):
        services.escalate(actor=commander, incident=incident, level=3, reason="again")
    with pytest.raises(InvalidRequest, match="escalation level must be 1 to 4"):
        services.escalate(actor=commander, incident=incident, level=5, reason="x")
    with pytest.raises(InvalidRequest, match="a reason is required"):
        services.escalate(actor=commander, incident=incident, level=4, reason=" ")


def test_a_correction_is_a_new_entry_pointing_at_the_old_one(commander):
    incident = open_one(commander)
    note = services.add_note(actor=commander, incident=incident, text="lock held by deploy-41")
    correction = services.correct_entry(actor=commander, entry=note, text="deploy-42, not 41")
    note.refresh_from_db()
    assert note.text == "lock held by deploy-41"
    assert correction.corrects == note
    assert correction.kind == EntryKind.CORRECTION
    assert kinds(incident) == [EntryKind.OPENED, EntryKind.NOTE, EntryKind.CORRECTION]


def test_editing_the_post_mortem_is_noted_on_the_timeline(commander):
    incident = open_one(commander)
    incident.root_cause = "an index built without CONCURRENTLY"
    services.update_incident(actor=commander, incident=incident, changed=["root_cause"])
    incident.refresh_from_db()
    assert incident.root_cause == "an index built without CONCURRENTLY"
    assert incident.timeline.get(kind=EntryKind.EDIT).text == "Edited: root cause"


# --- the validation checklist and closing ------------------------------------------------------
def test_opening_creates_the_runbook_checklist(commander):
    incident = open_one(commander)
    items = list(incident.checklist.order_by("id"))
    assert [item.key for item in items] == CHECKLIST_KEYS
    assert {item.result for item in items} == {CheckResult.PENDING}


def test_ticking_an_item_needs_evidence_and_lands_on_the_timeline(commander):
    incident = open_one(commander)
    item = incident.checklist.get(key=ChecklistKey.AUTO_MIGRATE)
    with pytest.raises(InvalidRequest, match="evidence is required"):
        services.tick_checklist_item(actor=commander, item=item, passed=True, evidence=" ")

    services.tick_checklist_item(
        actor=commander, item=item, passed=True, evidence="AUTO_MIGRATE=false in all pods"
    )
    item.refresh_from_db()
    assert (item.result, item.checked_by, item.automatic) == ("passed", "commander", False)
    assert item.checked_at is not None
    entry = incident.timeline.get(kind=EntryKind.CHECKLIST)
    assert entry.text == (
        "Checklist: AUTO_MIGRATE set correctly passed: AUTO_MIGRATE=false in all pods"
    )


def test_post_mortem_needs_the_recovered_time(commander):
    incident = open_one(commander)
    services.change_status(actor=commander, incident=incident, status=IncidentStatus.MONITORING)
    with pytest.raises(InvalidRequest, match=r"post-mortem: the recovered time is not set$"):
        services.change_status(
            actor=commander, incident=incident, status=IncidentStatus.POST_MORTEM
        )


def test_closing_is_refused_until_complete_then_closes(commander):
    incident = open_one(commander)
    services.change_status(actor=commander, incident=incident, status=IncidentStatus.RESOLVED)
    services.change_status(actor=commander, incident=incident, status=IncidentStatus.POST_MORTEM)
    items = list(incident.checklist.order_by("id"))
    for item in items[:-1]:
        services.tick_checklist_item(actor=commander, item=item, passed=True, evidence="seen")
    services.tick_checklist_item(actor=commander, item=items[-1], passed=False, evidence="one")

    with pytest.raises(InvalidRequest) as refused:
        services.change_status(actor=commander, incident=incident, status=IncidentStatus.CLOSED)
    assert str(refused.value) == (
        f"incident #{incident.pk} cannot move to closed: checklist items not passed: "
        "No migration attempts in logs; no root cause; "
        "no action items and no reason why none are needed"
    )

    services.tick_checklist_item(actor=commander, item=items[-1], passed=True, evidence="none")
    incident.root_cause = "index built without CONCURRENTLY"
    services.update_incident(actor=commander, incident=incident, changed=["root_cause"])
    with pytest.raises(InvalidRequest, match=r"closed: no action items and no reason why none"):
        services.change_status(actor=commander, incident=incident, status=IncidentStatus.CLOSED)
    services.add_action_item(
        actor=commander,
        incident=incident,
        title="lint migrations for CREATE INDEX without CONCURRENTLY",
        kind=ActionItemKind.PREVENTIVE,
        owner=commander.user,
    )
    incident = services.change_status(
        actor=commander, incident=incident, status=IncidentStatus.CLOSED
    )
    assert incident.status == IncidentStatus.CLOSED
    assert incident.closed_at is not None
    with pytest.raises(InvalidRequest, match="is closed: its checklist is final"):
        services.tick_checklist_item(actor=commander, item=items[0], passed=True, evidence="x")


def test_closing_straight_from_detected_names_every_missing_piece(commander):
    incident = open_one(commander)
    with pytest.raises(InvalidRequest) as refused:
        services.change_status(actor=commander, incident=incident, status=IncidentStatus.CLOSED)
    assert str(refused.value) == (
        f"incident #{incident.pk} cannot move to closed: the recovered time is not set; "
        "checklist items not passed: AUTO_MIGRATE set correctly, No stuck locks, "
        "Migration tracking consistent, API endpoints responding, Monitoring normal, "
        "No migration attempts in logs; no root cause; "
        "no action items and no reason why none are needed"
    )
    incident.refresh_from_db()
    assert (incident.status, incident.closed_at) == (IncidentStatus.DETECTED, None)


def ready_to_close(commander, **fields):
    """An incident in post-mortem with every checklist item passed and a root cause."""
    incident = open_one(commander)
    services.change_status(actor=commander, incident=incident, status=IncidentStatus.RESOLVED)
    services.change_status(actor=commander, incident=incident, status=IncidentStatus.POST_MORTEM)
    for item in incident.checklist.all():
        services.tick_checklist_item(actor=commander, item=item, passed=True, evidence="seen")
    for name, value in {"root_cause": "index built without CONCURRENTLY", **fields}.items():
        setattr(incident, name, value)
    services.update_incident(actor=commander, incident=incident, changed=["root_cause", *fields])
    return incident


def close(commander, incident):
    return services.change_status(actor=commander, incident=incident, status=IncidentStatus.CLOSED)


def test_a_written_reason_closes_without_action_items(commander):
    blank = ready_to_close(commander, no_action_items_reason="  ")
    with pytest.raises(InvalidRequest, match="no action items and no reason why none"):
        close(commander, blank)

    incident = ready_to_close(
        commander, no_action_items_reason="one-off: the deploy tool was already retired"
    )
    incident = close(commander, incident)
    assert incident.status == IncidentStatus.CLOSED
    assert incident.action_items.count() == 0


def test_a_closed_post_mortem_is_frozen_and_takes_addenda(commander):
    incident = close(commander, ready_to_close(commander, no_action_items_reason="none needed"))
    closed_at = incident.closed_at

    incident.root_cause = "rewritten afterwards"
    with pytest.raises(InvalidRequest) as refused:
        services.update_incident(actor=commander, incident=incident, changed=["root_cause"])
    assert str(refused.value) == (
        f"incident #{incident.pk} is closed: its post-mortem is frozen, add an addendum instead"
    )
    for refused_change in (
        lambda: services.set_timestamp(
            actor=commander, incident=incident, name="recovered", when=timezone.now()
        ),
        lambda: services.escalate(actor=commander, incident=incident, level=2, reason="late"),
    ):
        with pytest.raises(InvalidRequest, match="its post-mortem is frozen"):
            refused_change()
    incident.refresh_from_db()
    assert incident.root_cause == "index built without CONCURRENTLY"
    assert incident.escalation_level == 1

    addendum = services.add_addendum(
        actor=commander, incident=incident, text="the same index failed on the replica too"
    )
    assert (addendum.added_by, addendum.text) == (
        "commander",
        "the same index failed on the replica too",
    )
    entry = incident.timeline.order_by("-id").first()
    assert entry.kind == EntryKind.ADDENDUM
    assert entry.text == (
        f"Post-mortem addendum #{addendum.pk}: the same index failed on the replica too"
    )
    incident.refresh_from_db()
    assert incident.closed_at == closed_at


def test_an_addendum_needs_a_closed_incident_and_text(commander):
    incident = ready_to_close(commander)
    with pytest.raises(InvalidRequest, match="is not closed: edit its post-mortem instead"):
        services.add_addendum(actor=commander, incident=incident, text="later finding")
    services.add_action_item(
        actor=commander, incident=incident, title="t", kind="corrective", owner=commander.user
    )
    incident = close(commander, incident)
    with pytest.raises(InvalidRequest, match="an addendum cannot be empty"):
        services.add_addendum(actor=commander, incident=incident, text=" \n")
    assert incident.addenda.count() == 0


def test_postgresql_refuses_to_update_an_addendum(commander):
    from django.db import connection, transaction
    from django.db.utils import DatabaseError

    incident = close(commander, ready_to_close(commander, no_action_items_reason="none"))
    addendum = services.add_addendum(actor=commander, incident=incident, text="first finding")
    with (
        pytest.raises(DatabaseError, match="post-mortem addenda are append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(
            "UPDATE incidents_postmortemaddendum SET text = 'rewritten' WHERE id = %s",
            [addendum.pk],
        )
    addendum.refresh_from_db()
    assert addendum.text == "first finding"


def test_escalation_names_the_contact_as_it_was_then(commander):
    contact = EscalationContact.objects.get(level=2)
    incident = services.escalate(
        actor=commander, incident=open_one(commander), level=2, reason="schema drift"
    )
    contact.team = "Data platform"
    contact.reaches = "Slack: #data-platform"
    contact.save()

    entry = incident.timeline.get(kind=EntryKind.ESCALATION)
    assert entry.text == (
        "Escalated to Level 2: database team (schema issues): schema drift; reaches Database "
        "team (Email: database-team@example.com, Slack: #incidents)"
    )
    assert entry.details["team"] == "Database team"


def test_the_commander_is_chosen_at_opening_and_handed_over_on_the_timeline(commander):
    other = UserFactory(username="second", permissions=["incidents.change_incident"])
    incident = services.open_incident(
        actor=commander, title="t", scenario=Scenario.OTHER, severity="sev3", commander=other
    )
    assert (incident.commander, incident.commander_name) == (other, "second")
    assert incident.opened_by == "commander"

    incident = services.change_commander(
        actor=commander, incident=incident, commander=commander.user
    )
    assert incident.commander_name == "commander"
    assert incident.timeline.get(kind=EntryKind.EDIT).text == "Commander: second → commander"
    with pytest.raises(InvalidRequest, match="commander already commands incident"):
        services.change_commander(actor=commander, incident=incident, commander=commander.user)


def test_a_commander_must_be_able_to_change_incidents(commander):
    viewer = UserFactory(username="viewer", permissions=["incidents.view_incident"])
    with pytest.raises(InvalidRequest, match="viewer cannot command incidents"):
        services.open_incident(
            actor=commander, title="t", scenario=Scenario.OTHER, severity="sev3", commander=viewer
        )
    incident = open_one(commander)
    with pytest.raises(InvalidRequest, match="viewer cannot command incidents"):
        services.change_commander(actor=commander, incident=incident, commander=viewer)
    incident.refresh_from_db()
    assert incident.commander_name == "commander"
    assert kinds(incident) == [EntryKind.OPENED]


def test_action_items_are_added_and_moved_on_with_each_change_on_the_timeline(commander):
    owner = UserFactory(username="dba")
    incident = open_one(commander)
    item = services.add_action_item(
        actor=commander,
        incident=incident,
        title="alert on locks held > 30 s",
        kind=ActionItemKind.DETECTIVE,
        owner=owner,
        due_date=dt.date(2026, 12, 1),
        link="https://tracker.example.com/OPS-12",
    )
    assert (item.owner_name, item.created_by, item.status) == ("dba", "commander", "open")
    added = incident.timeline.get(kind=EntryKind.ACTION_ITEM)
    assert added.text == (
        f"Action item #{item.pk} added (detective): alert on locks held > 30 s; owner dba, "
        "due 2026-12-01"
    )

    item = services.update_action_item(
        actor=commander,
        item=item,
        status=ActionItemStatus.IN_PROGRESS,
        due_date=dt.date(2026, 12, 15),
        owner=commander.user,
    )
    assert (item.status, item.owner, item.owner_name) == (
        "in_progress",
        commander.user,
        "commander",
    )
    updated = incident.timeline.filter(kind=EntryKind.ACTION_ITEM).order_by("id").last()
    assert updated.text == (
        f"Action item #{item.pk} (alert on locks held > 30 s): status Open → In progress; "
        "due 2026-12-01 → 2026-12-15; owner dba → commander"
    )
    with pytest.raises(InvalidRequest, match=f"action item #{item.pk}: nothing to change"):
        services.update_action_item(actor=commander, item=item, status="in_progress")


def test_action_items_move_on_after_closing(commander):
    incident = ready_to_close(commander)
    item = services.add_action_item(
        actor=commander, incident=incident, title="lint", kind="preventive", owner=commander.user
    )
    close(commander, incident)
    item = services.update_action_item(actor=commander, item=item, status=ActionItemStatus.DONE)
    assert item.status == ActionItemStatus.DONE


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"title": " "}, "an action item needs a title"),
        ({"kind": "cosmetic"}, "unknown action item kind 'cosmetic'"),
        ({"owner": None}, "an action item needs an owner"),
        ({"link": "tracker/OPS-1"}, r"the link must be an http\(s\) address"),
        ({"link": "javascript:alert(1)"}, r"the link must be an http\(s\) address"),
    ],
)
def test_action_items_refuse_bad_input(commander, change, message):
    incident = open_one(commander)
    fields = {"title": "lint", "kind": "preventive", "owner": commander.user, **change}
    with pytest.raises(InvalidRequest, match=message):
        services.add_action_item(actor=commander, incident=incident, **fields)
    assert incident.action_items.count() == 0
    assert kinds(incident) == [EntryKind.OPENED]


def test_updating_an_action_item_refuses_an_unknown_status(commander):
    incident = open_one(commander)
    item = services.add_action_item(
        actor=commander, incident=incident, title="lint", kind="preventive", owner=commander.user
    )
    with pytest.raises(InvalidRequest, match="unknown action item status 'finished'"):
        services.update_action_item(actor=commander, item=item, status="finished")
    item.refresh_from_db()
    assert item.status == ActionItemStatus.OPEN


def test_follow_ups_need_the_change_permission(commander):
    incident = open_one(commander)
    viewer = Actor.for_user(UserFactory(permissions=["incidents.view_incident"]), Door.ADMIN)
    with pytest.raises(PermissionDenied, match="not allowed to change incidents"):
        services.add_action_item(
            actor=viewer, incident=incident, title="t", kind="corrective", owner=viewer.user
        )
    with pytest.raises(PermissionDenied):
        services.change_commander(actor=viewer, incident=incident, commander=commander.user)
    with pytest.raises(PermissionDenied):
        services.add_addendum(actor=viewer, incident=incident, text="x")
    assert kinds(incident) == [EntryKind.OPENED]
