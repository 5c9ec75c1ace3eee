"""Runtime flags: validated changes with their history, the emergency disable, and the guided
three-step re-enable, each refused whole when anything is wrong."""

import pytest
from django.db import connection, transaction
from django.db.utils import DatabaseError

from migrations_ops import selectors, services
from migrations_ops.actors import Actor
from migrations_ops.models import (
    AuditEvent,
    Door,
    Environment,
    FlagChange,
    FlagChangeKind,
    FlagStage,
    Target,
)
from migrations_ops.roles import AUDITOR, ON_CALL
from tests.factories import TargetFactory, member

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]


@pytest.fixture
def engineer():
    return Actor.for_user(member(ON_CALL, "oncall"), Door.ADMIN)


@pytest.fixture
def orders():
    return TargetFactory(name="orders-db", max_retries=3)


def flags(target):
    return selectors.flags_of(Target.objects.get(pk=target.pk))


def test_a_change_sets_the_flags_and_records_exactly_what_changed(engineer, orders):
    change = services.change_flags(
        actor=engineer,
        target=orders,
        changes={"AUTO_MIGRATE": False, "MIGRATION_MAX_RETRIES": 0, "EMERGENCY_BYPASS": False},
        reason="migration loop in prod",
    )

    assert flags(orders)["AUTO_MIGRATE"] is False
    assert flags(orders)["MIGRATION_MAX_RETRIES"] == 0
    # EMERGENCY_BYPASS was false already: not part of the change
    assert change.before == {"AUTO_MIGRATE": True, "MIGRATION_MAX_RETRIES": 3}
    assert change.after == {"AUTO_MIGRATE": False, "MIGRATION_MAX_RETRIES": 0}
    assert (change.kind, change.door, change.actor_name) == ("set", "admin", "oncall")
    assert change.reason == "migration loop in prod"
    # a change by hand is not an emergency disable: the stage stays
    assert change.stage_before == change.stage_after == FlagStage.NORMAL
    event = AuditEvent.objects.get(action="flags.changed")
    assert event.target_name == "orders-db"
    assert event.details["before"] == change.before
    assert event.details["after"] == change.after
    assert event.details["kind"] == "set"
    assert list(selectors.flag_history(orders)) == [change]


def test_text_values_from_a_door_are_parsed(engineer, orders):
    services.change_flags(
        actor=engineer,
        target=orders,
        changes={"MIGRATION_DRY_RUN": "true", "MIGRATION_CACHE_TTL": "300"},
        reason="preview only",
    )
    assert flags(orders)["MIGRATION_DRY_RUN"] is True
    assert flags(orders)["MIGRATION_CACHE_TTL"] == 300


@pytest.mark.parametrize(
    ("changes", "reason", "message"),
    [
        (
            {"MIGRATION_MAX_RETRIES": -1},
            "x",
            "MIGRATION_MAX_RETRIES=-1: Ensure this value is greater than or equal to 0.",
        ),
        ({"MIGRATION_MAX_RETRIES": 11}, "x", "less than or equal to 10"),
        ({"MIGRATION_LOCK_TIMEOUT": 0}, "x", "MIGRATION_LOCK_TIMEOUT=0: Ensure"),
        ({"MIGRATION_CACHE_TTL": 86_401}, "x", "MIGRATION_CACHE_TTL=86401: Ensure"),
        ({"AUTO_MIGRATE": "maybe"}, "x", "AUTO_MIGRATE must be true or false"),
        ({"MIGRATION_MAX_RETRIES": "three"}, "x", "must be a whole number"),
        ({"AUTO_MIGRATE": False, "AUTOMIGRATE": False}, "x", "unknown flag AUTOMIGRATE (known: "),
        ({"AUTO_MIGRATE": False}, "  ", "a reason is required"),
        ({"AUTO_MIGRATE": True}, "x", "nothing to change: orders-db already has AUTO_MIGRATE=true"),
        ({}, "x", "nothing to change: no flag given"),
    ],
)
def test_a_bad_change_is_refused_with_one_line_and_changes_nothing(
    engineer, orders, changes, reason, message
):
    before = flags(orders)
    with pytest.raises(services.InvalidRequest) as refused:
        services.change_flags(actor=engineer, target=orders, changes=changes, reason=reason)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)
    assert flags(orders) == before
    assert FlagChange.objects.count() == 0
    assert not AuditEvent.objects.filter(action="flags.changed").exists()


def test_an_auditor_may_not_change_disable_or_reenable(orders):
    auditor = Actor.for_user(member(AUDITOR, "auditor"), Door.ADMIN)
    calls = [
        lambda: services.change_flags(
            actor=auditor, target=orders, changes={"AUTO_MIGRATE": False}, reason="x"
        ),
        lambda: services.emergency_disable(actor=auditor, targets=[orders], reason="x"),
        lambda: services.reenable_step(actor=auditor, target=orders, step=1, reason="x"),
    ]
    for call in calls:
        with pytest.raises(services.PermissionDenied, match="auditor is not allowed to"):
            call()
    assert FlagChange.objects.count() == 0
    assert flags(orders)["AUTO_MIGRATE"] is True


def test_emergency_disable_of_several_targets(engineer, orders):
    billing = TargetFactory(name="billing-db", environment=Environment.PRODUCTION)
    untouched = TargetFactory(name="search-db")

    changes = services.emergency_disable(
        actor=engineer, targets=[billing, orders], reason="bad migration everywhere"
    )

    assert [change.target.name for change in changes] == ["orders-db", "billing-db"]  # id order
    for target in (orders, billing):
        current = flags(target)
        assert current["AUTO_MIGRATE"] is False
        assert current["MIGRATION_DRY_RUN"] is True
        assert current["MIGRATION_MAX_RETRIES"] == 0
        assert Target.objects.get(pk=target.pk).flag_stage == FlagStage.DISABLED
    change = changes[0]
    assert change.kind == FlagChangeKind.EMERGENCY_DISABLE
    assert change.before == {
        "AUTO_MIGRATE": True,
        "MIGRATION_DRY_RUN": False,
        "MIGRATION_MAX_RETRIES": 3,
    }
    assert change.after == {
        "AUTO_MIGRATE": False,
        "MIGRATION_DRY_RUN": True,
        "MIGRATION_MAX_RETRIES": 0,
    }
    assert (change.stage_before, change.stage_after) == ("normal", "disabled")
    assert flags(untouched)["AUTO_MIGRATE"] is True
    assert AuditEvent.objects.filter(action="flags.changed").count() == 2


def test_emergency_disable_is_all_or_nothing(engineer, orders):
    gone = TargetFactory(name="gone-db")
    Target.objects.filter(pk=gone.pk).delete()
    with pytest.raises(services.TargetNotFound, match="gone-db"):
        services.emergency_disable(actor=engineer, targets=[orders, gone], reason="x")
    assert flags(orders)["AUTO_MIGRATE"] is True
    assert FlagChange.objects.count() == 0
    with pytest.raises(services.InvalidRequest, match="a reason is required"):
        services.emergency_disable(actor=engineer, targets=[orders], reason="")
    with pytest.raises(services.InvalidRequest, match="no target to disable"):
        services.emergency_disable(actor=engineer, targets=[], reason="x")


def test_the_progressive_reenable_runs_in_order(engineer, orders):
    assert selectors.next_reenable_step(orders) is None
    with pytest.raises(services.InvalidRequest, match="not emergency-disabled"):
        services.reenable_step(actor=engineer, target=orders, step=1, reason="x")

    services.emergency_disable(actor=engineer, targets=[orders], reason="incident")
    orders.refresh_from_db()
    assert selectors.next_reenable_step(orders) == 1
    with pytest.raises(services.InvalidRequest) as refused:
        services.reenable_step(actor=engineer, target=orders, step=2, reason="too soon")
    assert str(refused.value) == "step 2 is not due on orders-db: step 1 is next"
    assert FlagChange.objects.count() == 1

    first = services.reenable_step(actor=engineer, target=orders, step=1, reason="dry run first")
    assert first.kind == FlagChangeKind.REENABLE_DRY_RUN
    assert first.before == {"AUTO_MIGRATE": False}
    assert first.after == {"AUTO_MIGRATE": True}  # dry run was on already
    assert (first.stage_before, first.stage_after) == ("disabled", "dry_run")
    with pytest.raises(services.InvalidRequest, match="step 3 is not due on orders-db: step 2"):
        services.reenable_step(actor=engineer, target=orders, step=3, reason="x")

    second = services.reenable_step(actor=engineer, target=orders, step=2, reason="dry run ok")
    assert second.after == {"MIGRATION_DRY_RUN": False, "MIGRATION_MAX_RETRIES": 1}
    assert flags(orders)["MIGRATION_DRY_RUN"] is False  # limited rollout runs for real

    third = services.reenable_step(actor=engineer, target=orders, step=3, reason="all good")
    assert third.kind == FlagChangeKind.REENABLE_FULL
    assert third.before == {"MIGRATION_MAX_RETRIES": 1}
    assert third.after == {"MIGRATION_MAX_RETRIES": 3}
    assert (third.stage_before, third.stage_after) == ("limited", "normal")
    orders.refresh_from_db()
    assert selectors.next_reenable_step(orders) is None
    assert flags(orders)["AUTO_MIGRATE"] is True
    kinds = [change.kind for change in selectors.flag_history(orders)]
    assert kinds == ["reenable_3", "reenable_2", "reenable_1", "emergency_disable"]


def test_a_change_by_hand_during_the_reenable_keeps_the_step_due(engineer, orders):
    services.emergency_disable(actor=engineer, targets=[orders], reason="incident")
    change = services.change_flags(
        actor=engineer, target=orders, changes={"MIGRATION_CACHE_TTL": 5}, reason="faster"
    )
    assert change.stage_before == change.stage_after == FlagStage.DISABLED
    orders.refresh_from_db()
    assert selectors.next_reenable_step(orders) == 1


def test_unknown_step_is_refused(engineer, orders):
    with pytest.raises(services.InvalidRequest, match="no re-enable step 4"):
        services.reenable_step(actor=engineer, target=orders, step=4, reason="x")


def test_registration_records_the_initial_flags_in_its_audit_event(engineer):
    services.register_target(
        actor=Actor.shell_operator(),
        name="new-db",
        url="sqlite:////tmp/new-db.sqlite3",
        convention="runbook",
        environment="staging",
        lock_timeout_seconds=120,
    )
    event = AuditEvent.objects.get(action="target.registered")
    assert event.details["flags"]["MIGRATION_LOCK_TIMEOUT"] == 120
    assert event.details["flags"]["AUTO_MIGRATE"] is True
    assert FlagChange.objects.count() == 0


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE migrations_ops_flagchange SET reason = 'rewritten' WHERE id = %s",
        "DELETE FROM migrations_ops_flagchange WHERE id = %s",
    ],
)
def test_postgresql_refuses_to_rewrite_flag_history(engineer, orders, statement):
    change = services.change_flags(
        actor=engineer, target=orders, changes={"AUTO_MIGRATE": False}, reason="original"
    )
    assert connection.vendor == "postgresql"
    with (
        pytest.raises(DatabaseError, match="flag changes are append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(statement, [change.pk])
    assert FlagChange.objects.get(pk=change.pk).reason == "original"
