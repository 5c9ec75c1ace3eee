"""Flag changes land on the timelines of the open incidents affecting their target, and a
failure there never undoes the change."""

import logging

import pytest

from incidents import services as incident_services
from incidents.models import EntryKind, IncidentStatus, Scenario
from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import Door, FlagChange, Target
from tests.factories import IncidentFactory, TargetFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def engineer():
    user = UserFactory(username="oncall", permissions=["migrations_ops.change_flags"])
    return Actor.for_user(user, Door.CLI)


def open_on(commander, target, status=IncidentStatus.DETECTED):
    incident = incident_services.open_incident(
        actor=commander,
        title="migration loop",
        scenario=Scenario.CONCURRENT_CONFLICT,
        severity="sev2",
        targets=[target],
    )
    if status != IncidentStatus.DETECTED:
        incident = incident_services.change_status(
            actor=commander, incident=incident, status=status
        )
    return incident


def flag_entries(incident):
    return list(incident.timeline.filter(kind=EntryKind.FLAG).order_by("id"))


def test_a_flag_change_lands_on_the_open_incident_only(commander, engineer):
    target = TargetFactory(name="orders-db")
    open_incident = open_on(commander, target)
    resolved = open_on(commander, target, status=IncidentStatus.RESOLVED)
    closed = IncidentFactory(status=IncidentStatus.CLOSED)  # as a closed one stands
    closed.affected_targets.add(target)
    unrelated = open_on(commander, TargetFactory(name="search-db"))

    change = services.change_flags(
        actor=engineer,
        target=target,
        changes={"AUTO_MIGRATE": False},
        reason="stop the loop",
    )

    (entry,) = flag_entries(open_incident)
    assert (
        entry.text
        == "flags of orders-db: AUTO_MIGRATE true → false (stop the loop), by oncall via cli"
    )
    assert entry.actor_name == "oncall"
    assert entry.details["flag_change"] == change.pk
    assert entry.details["after"] == {"AUTO_MIGRATE": False}
    assert flag_entries(resolved) == []
    assert flag_entries(closed) == []
    assert flag_entries(unrelated) == []


def test_emergency_disable_and_reenable_steps_are_named_on_the_timeline(commander, engineer):
    target = TargetFactory(name="orders-db", max_retries=3)
    incident = open_on(commander, target, status=IncidentStatus.MITIGATING)

    services.emergency_disable(actor=engineer, targets=[target], reason="runbook quick disable")
    services.reenable_step(actor=engineer, target=target, step=1, reason="dry run")

    disabled, step_1 = flag_entries(incident)
    assert disabled.text.startswith(
        "Emergency disable: flags of orders-db: AUTO_MIGRATE true → false, "
        "MIGRATION_DRY_RUN false → true, MIGRATION_MAX_RETRIES 3 → 0, "
        "stage Normal → Emergency-disabled (runbook quick disable)"
    )
    assert step_1.text.startswith("Re-enable step 1: dry run: flags of orders-db: AUTO_MIGRATE")


def test_a_failure_to_write_the_timeline_never_undoes_the_change(
    commander, engineer, monkeypatch, caplog
):
    target = TargetFactory(name="orders-db")
    incident = open_on(commander, target)

    def broken(flag_change):
        raise RuntimeError("timeline unavailable")

    monkeypatch.setattr(incident_services, "record_flag_change", broken)
    with caplog.at_level(logging.ERROR):
        services.change_flags(
            actor=engineer, target=target, changes={"AUTO_MIGRATE": False}, reason="stop"
        )

    assert Target.objects.get(pk=target.pk).auto_migrate is False
    assert FlagChange.objects.count() == 1
    assert flag_entries(incident) == []
    assert "could not note flag change" in caplog.text
