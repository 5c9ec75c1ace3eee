"""A whole incident run through the admin, as a commander does it: opened from a target whose
migration lock is stuck, the force-unlock and the rollback landing on the timeline by
themselves, the checks run, closing refused until the post-mortem is complete, then closed,
frozen, and exported as Markdown with the real timeline."""

import datetime as dt

import pytest
from django.contrib.auth.models import Group
from django.urls import reverse

from incidents.models import CheckResult, EntryKind, Incident, IncidentStatus, Scenario
from incidents.postmortem import cell
from migrations_ops import services as ops
from migrations_ops.actors import Actor
from migrations_ops.models import Operation, OperationStatus
from migrations_ops.roles import INCIDENT_COMMANDER
from tests.factories import TargetFactory, UserFactory
from tests.scripts_folder import EMAIL, USERS, apply_directly, write_folder

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]


@pytest.fixture
def orders(pg_target, tmp_path):
    """A PostgreSQL target whose deploy crashed 20 minutes ago holding the migration lock."""
    pg_target.create_runbook_books()
    apply_directly(pg_target, USERS, EMAIL)
    target = TargetFactory(db=pg_target, name="orders", lock_timeout_seconds=60, max_retries=0)
    ops.import_scripts(
        actor=Actor.shell_operator(), target=target, directory=write_folder(tmp_path, USERS, EMAIL)
    )
    pg_target.take_runbook_lock(lock_age=dt.timedelta(minutes=20), locked_by="deploy-42")
    target.db = pg_target
    return target


@pytest.fixture
def commander(client):
    user = UserFactory(username="ic")
    user.groups.add(Group.objects.get(name=INCIDENT_COMMANDER))
    client.force_login(user)
    return client


def page(client, incident) -> str:
    return client.get(
        reverse("admin:incidents_incident_change", args=[incident.pk])
    ).content.decode()


def act(client, incident, slug, data) -> list[tuple[str, str]]:
    response = client.post(
        reverse("admin:incidents_incident_act", args=[incident.pk, slug]), data, follow=True
    )
    return [(message.level_tag, message.message) for message in response.context["messages"]]


def move_to(client, incident, status) -> list[tuple[str, str]]:
    return act(client, incident, "status", {"status": status})


def test_a_stuck_lock_incident_from_opening_to_the_markdown(
    commander, orders, django_capture_on_commit_callbacks
):
    client = commander
    # Opened from the admin's add form, on the stuck target.
    response = client.post(
        reverse("admin:incidents_incident_add"),
        {
            "title": "orders: migration lock stuck after a crashed deploy",
            "scenario": Scenario.CONCURRENT_CONFLICT,
            "severity": "sev2",
            "affected_targets": [orders.pk],
            "culprit_migration": "002_add_email.sql",
        },
    )
    assert response.status_code == 302
    incident = Incident.objects.get()
    assert incident.commander_name == "ic"

    # Mitigate: release the lock from the target's own admin page.
    with django_capture_on_commit_callbacks(execute=True):
        client.post(
            reverse("admin:migrations_ops_target_force_unlock", args=[orders.pk]),
            {"reason": "deploy-42 crashed holding the lock"},
        )
    unlock = Operation.objects.get(kind="force_unlock")
    assert unlock.status == OperationStatus.SUCCEEDED, unlock.error
    assert orders.db.runbook_lock_rows() == []
    assert move_to(client, incident, "mitigating")[0][0] == "success"

    # Recover: roll back the culprit from the target's rollback page.
    with django_capture_on_commit_callbacks(execute=True):
        client.post(
            reverse("admin:migrations_ops_target_operate", args=[orders.pk, "rollback"]),
            {"reason": "002 broke the orders page", "version": "002"},
        )
    rollback = Operation.objects.get(kind="rollback")
    assert rollback.status == OperationStatus.SUCCEEDED, rollback.error
    assert orders.db.query("SELECT filename FROM migrations") == [("001_create_users.sql",)]

    # Both operations wrote themselves onto the timeline, requested and finished.
    entries = list(incident.timeline.filter(kind=EntryKind.OPERATION).order_by("id"))
    assert [(entry.operation_id, entry.details["status"]) for entry in entries] == [
        (unlock.pk, OperationStatus.QUEUED),
        (unlock.pk, OperationStatus.SUCCEEDED),
        (rollback.pk, OperationStatus.QUEUED),
        (rollback.pk, OperationStatus.SUCCEEDED),
    ]
    shown = page(client, incident)
    assert "deploy-42 crashed holding the lock" in shown
    assert f"Operation #{rollback.pk} (" in shown

    assert move_to(client, incident, "monitoring")[0][0] == "success"
    assert move_to(client, incident, "resolved")[0][0] == "success"

    # The console checks what it can by itself, live.
    client.post(
        reverse("admin:incidents_incident_changelist"),
        {"action": "run_checks", "_selected_action": [incident.pk]},
    )
    automatic = incident.checklist.filter(automatic=True)
    assert {item.key for item in automatic} >= {"no_stuck_locks", "tracking_consistent"}
    assert {item.result for item in automatic} == {CheckResult.PASSED}

    assert move_to(client, incident, "post_mortem")[0][0] == "success"
    manual = list(incident.checklist.filter(result=CheckResult.PENDING).order_by("id"))
    assert manual, "some items are for a person"
    pending_names = ", ".join(item.get_key_display() for item in manual)
    assert move_to(client, incident, "closed") == [
        (
            "error",
            f"incident #{incident.pk} cannot move to closed: checklist items not passed: "
            f"{pending_names}; no root cause; no action items and no reason why none are needed",
        )
    ]

    # Complete it: the manual items with evidence, the root cause, a follow-up.
    for item in manual:
        act(
            client,
            incident,
            "checklist",
            {"item": item.pk, "result": "passed", "evidence": f"checked by hand: {item.key}"},
        )
    response = client.post(
        reverse("admin:incidents_incident_change", args=[incident.pk]),
        {
            **{name: getattr(incident, name) for name in ("title", "severity")},
            "culprit_migration": incident.culprit_migration,
            "root_cause": "the deploy tool does not release the lock when it crashes",
            **{
                f"{prefix}-{suffix}": "0"
                for prefix in ("checklist", "action_items")
                for suffix in ("TOTAL_FORMS", "INITIAL_FORMS")
            },
        },
        follow=True,
    )
    assert response.redirect_chain[0][1] == 302
    assert move_to(client, incident, "closed") == [
        (
            "error",
            f"incident #{incident.pk} cannot move to closed: "
            "no action items and no reason why none are needed",
        )
    ]
    act(
        client,
        incident,
        "action-item",
        {
            "title": "release the lock on crash",
            "kind": "corrective",
            "owner": incident.commander_id,
        },
    )
    assert move_to(client, incident, "closed") == [
        ("success", f"Incident #{incident.pk} is now closed.")
    ]
    incident.refresh_from_db()
    assert incident.status == IncidentStatus.CLOSED
    assert incident.closed_at is not None

    # Frozen: the form no longer edits the post-mortem; an addendum is appended.
    shown = page(client, incident)
    assert 'name="root_cause"' not in shown
    act(client, incident, "addendum", {"text": "staging had the same stuck lock a week before"})

    markdown = client.get(
        reverse("admin:incidents_incident_postmortem", args=[incident.pk])
    ).content.decode()
    for entry in incident.timeline.order_by("occurred_at", "id"):
        assert f"| {entry.actor_name} | {cell(entry.text)} |" in markdown
    assert f"Operation #{unlock.pk} (" in markdown
    assert "the deploy tool does not release the lock when it crashes" in markdown
    assert "staging had the same stuck lock a week before" in markdown
