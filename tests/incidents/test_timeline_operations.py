"""The timeline writes itself: operations on an affected target land on the open incidents'
timelines when requested and when finished, and a failure there never fails the operation."""

import datetime as dt

import pytest

from incidents import services as incident_services
from incidents.models import EntryKind, Incident, IncidentStatus, Scenario
from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import AuditEvent, Door, Operation, OperationStatus
from tests.factories import ON_CALL_PERMISSIONS, IncidentFactory, TargetFactory, UserFactory

pytestmark = pytest.mark.django_db

STALE = dt.timedelta(minutes=20)


@pytest.fixture
def engineer():
    return Actor.for_user(
        UserFactory(username="oncall", permissions=ON_CALL_PERMISSIONS), Door.ADMIN
    )


def open_on(commander, target, status=IncidentStatus.DETECTED):
    incident = incident_services.open_incident(
        actor=commander,
        title="lock stuck",
        scenario=Scenario.CONCURRENT_CONFLICT,
        severity="sev2",
        targets=[target],
    )
    if status != IncidentStatus.DETECTED:
        incident = incident_services.change_status(
            actor=commander, incident=incident, status=status
        )
    return incident


def operation_entries(incident):
    return list(incident.timeline.filter(kind=EntryKind.OPERATION).order_by("id"))


def test_force_unlock_appears_on_the_open_incident_and_not_on_a_resolved_one(
    pg_target, commander, engineer, django_capture_on_commit_callbacks
):
    pg_target.create_runbook_books(lock_age=STALE, locked_by="deploy-42")
    target = TargetFactory(db=pg_target)
    elsewhere = TargetFactory()
    open_incident = open_on(commander, target)
    resolved = open_on(commander, target, status=IncidentStatus.RESOLVED)
    unrelated = open_on(commander, elsewhere)

    with django_capture_on_commit_callbacks(execute=True):
        operation = services.request_force_unlock(
            actor=engineer, target=target, reason="deploy-42 crashed"
        )
    operation.refresh_from_db()
    assert operation.status == OperationStatus.SUCCEEDED

    requested, finished = operation_entries(open_incident)
    assert requested.operation_id == finished.operation_id == operation.pk
    assert requested.actor_name == "oncall"
    assert "requested by oncall via admin" in requested.text
    assert "deploy-42 crashed" in requested.text
    assert f"#{operation.pk}" in finished.text
    assert "succeeded" in finished.text
    assert "deploy-42" in finished.text  # the lock as it was
    assert finished.details["before"]["held"] is True
    assert finished.details["after"]["held"] is False
    assert operation_entries(resolved) == []
    assert operation_entries(unrelated) == []


def test_a_failure_to_write_the_timeline_never_fails_the_operation(
    pg_target, commander, engineer, django_capture_on_commit_callbacks, monkeypatch, caplog
):
    pg_target.create_runbook_books(lock_age=STALE, locked_by="deploy-42")
    target = TargetFactory(db=pg_target)
    incident = open_on(commander, target)

    def broken(operation):
        raise RuntimeError("timeline down")

    monkeypatch.setattr(incident_services, "record_operation", broken)
    with django_capture_on_commit_callbacks(execute=True):
        operation = services.request_force_unlock(actor=engineer, target=target, reason="stuck")
    operation.refresh_from_db()

    assert operation.status == OperationStatus.SUCCEEDED
    assert pg_target.runbook_lock_rows() == []
    assert operation_entries(incident) == []
    assert "could not note operation" in caplog.text


def test_an_operation_serving_an_incident_lands_on_it_even_when_it_affects_another_target(
    pg_target, commander, engineer, django_capture_on_commit_callbacks
):
    pg_target.create_runbook_books(lock_age=STALE, locked_by="deploy-42")
    target = TargetFactory(db=pg_target, name="orders")
    served = open_on(commander, TargetFactory(name="billing"), status=IncidentStatus.RESOLVED)
    affected = open_on(commander, target)

    with django_capture_on_commit_callbacks(execute=True):
        operation = services.request_force_unlock(
            actor=engineer, target=target, reason="billing waits on it", incident=served
        )
    operation.refresh_from_db()

    assert operation.status == OperationStatus.SUCCEEDED
    for incident in (served, affected):
        requested, finished = operation_entries(incident)
        assert requested.text.startswith(
            f"Operation #{operation.pk} (Force-release migration lock) on orders for incident "
            f"#{served.pk} requested by oncall via admin"
        )
        assert finished.operation_id == operation.pk
        assert finished.details["incident"] == served.pk
        assert "succeeded" in finished.text


def test_an_operation_serving_an_incident_that_affects_its_target_is_noted_once(
    pg_target, commander, engineer, django_capture_on_commit_callbacks
):
    pg_target.create_runbook_books(lock_age=STALE, locked_by="deploy-42")
    target = TargetFactory(db=pg_target)
    incident = open_on(commander, target)

    with django_capture_on_commit_callbacks(execute=True):
        operation = services.request_force_unlock(
            actor=engineer, target=target, reason="stuck", incident=incident
        )

    entries = operation_entries(incident)
    assert [entry.operation_id for entry in entries] == [operation.pk, operation.pk]
    assert "requested by oncall" in entries[0].text
    assert "succeeded" in entries[1].text


def test_an_incident_closed_while_its_operation_runs_gets_no_more_entries(
    pg_target, commander, engineer, django_capture_on_commit_callbacks
):
    pg_target.create_runbook_books(lock_age=STALE, locked_by="deploy-42")
    target = TargetFactory(db=pg_target)
    incident = open_on(commander, TargetFactory(), status=IncidentStatus.RESOLVED)
    operation = services.request_force_unlock(
        actor=engineer, target=target, reason="stuck", incident=incident
    )
    Incident.objects.filter(pk=incident.pk).update(status=IncidentStatus.CLOSED)

    services.execute_operation(operation.pk, worker="test-worker")

    operation.refresh_from_db()
    assert operation.status == OperationStatus.SUCCEEDED
    [requested] = operation_entries(incident)
    assert requested.operation_id == operation.pk
    assert "requested by oncall" in requested.text


def test_a_closed_incident_cannot_be_served(pg_target, commander, engineer):
    pg_target.create_runbook_books(lock_age=STALE, locked_by="deploy-42")
    target = TargetFactory(db=pg_target)
    incident = IncidentFactory(status=IncidentStatus.CLOSED)
    incident.affected_targets.add(target)

    with pytest.raises(
        services.InvalidRequest,
        match=rf"^incident #{incident.pk} is closed: operations can no longer be linked to it$",
    ):
        services.request_force_unlock(
            actor=engineer, target=target, reason="stuck", incident=incident
        )

    assert not Operation.objects.filter(target=target).exists()
    assert not AuditEvent.objects.filter(target=target, action="operation.requested").exists()
    assert incident.timeline.count() == 0
