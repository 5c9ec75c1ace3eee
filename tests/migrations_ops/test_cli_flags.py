"""``ops flags``, ``ops disable`` and ``ops reenable``."""

import io

import pytest
from django.core.management import CommandError, call_command

from migrations_ops.models import Environment, FlagChange, FlagStage, Target
from migrations_ops.roles import AUDITOR, ON_CALL
from tests.factories import TargetFactory, member

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]


def ops(*args) -> str:
    out = io.StringIO()
    call_command("ops", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.fixture
def orders():
    return TargetFactory(name="orders-db", max_retries=3)


def test_flags_shows_the_flags_and_stage(orders):
    assert ops("flags", "--target", "orders-db").splitlines() == [
        "AUTO_MIGRATE=true",
        "MIGRATION_DRY_RUN=false",
        "MIGRATION_MAX_RETRIES=3",
        "MIGRATION_LOCK_TIMEOUT=60",
        "MIGRATION_CACHE_TTL=60",
        "EMERGENCY_BYPASS=false",
        "stage: Normal",
    ]


def test_flags_set_changes_and_records_them(orders):
    member(ON_CALL, "oncall")
    printed = ops(
        "--as",
        "oncall",
        "flags",
        "--target",
        "orders-db",
        "--set",
        "AUTO_MIGRATE=false",
        "--set",
        "MIGRATION_MAX_RETRIES=0",
        "--reason",
        "loop in prod",
    )
    assert printed.splitlines()[0] == (
        "flags of orders-db changed: AUTO_MIGRATE true → false, MIGRATION_MAX_RETRIES 3 → 0"
    )
    assert "AUTO_MIGRATE=false" in printed.splitlines()
    change = FlagChange.objects.get()
    assert (change.door, change.actor_name, change.reason) == ("cli", "oncall", "loop in prod")
    assert change.after == {"AUTO_MIGRATE": False, "MIGRATION_MAX_RETRIES": 0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "MIGRATION_MAX_RETRIES=-1", "--reason", "x"], "greater than or equal to 0"),
        (["--set", "AUTOMIGRATE=false", "--reason", "x"], "unknown flag AUTOMIGRATE"),
        (["--set", "AUTO_MIGRATE=false"], "a reason is required"),
        (["--set", "AUTO_MIGRATE", "--reason", "x"], "--set takes NAME=VALUE"),
    ],
)
def test_a_bad_flags_command_fails_with_one_line_and_changes_nothing(orders, args, message):
    with pytest.raises(CommandError, match=message) as refused:
        ops("flags", "--target", "orders-db", *args)
    assert "\n" not in str(refused.value)
    assert FlagChange.objects.count() == 0
    assert Target.objects.get(pk=orders.pk).auto_migrate is True


def test_disable_named_targets_then_reenable_step_by_step(orders):
    TargetFactory(name="billing-db", environment=Environment.PRODUCTION)
    spared = TargetFactory(name="search-db")

    printed = ops(
        "disable", "--target", "orders-db", "--target", "billing-db", "--reason", "bad deploy"
    )
    assert printed.splitlines()[-1] == "auto-migration disabled on 2 target(s)"
    assert "orders-db: disabled (AUTO_MIGRATE true → false" in printed
    assert Target.objects.get(pk=spared.pk).flag_stage == FlagStage.NORMAL
    assert "next re-enable step: 1 (Dry run mode)" in ops("flags", "--target", "orders-db")

    with pytest.raises(CommandError, match=r"^step 2 is not due on orders-db: step 1 is next$"):
        ops("reenable", "--target", "orders-db", "--step", "2", "--reason", "too soon")
    for step in ("1", "2", "3"):
        printed = ops("reenable", "--target", "orders-db", "--step", step, "--reason", "ok")
        assert printed.startswith(f"re-enable step {step} taken on orders-db: ")
    assert printed.splitlines()[1:4] == [
        "AUTO_MIGRATE=true",
        "MIGRATION_DRY_RUN=false",
        "MIGRATION_MAX_RETRIES=3",
    ]
    assert Target.objects.get(pk=orders.pk).flag_stage == FlagStage.NORMAL


def test_disable_all(orders):
    TargetFactory(name="search-db")
    assert ops("disable", "--all", "--reason", "stop everything").splitlines()[-1] == (
        "auto-migration disabled on 2 target(s)"
    )
    assert set(Target.objects.values_list("flag_stage", flat=True)) == {"disabled"}


def test_disable_of_an_unknown_target_changes_nothing(orders):
    with pytest.raises(CommandError, match="unknown target 'nope'"):
        ops("disable", "--target", "orders-db", "--target", "nope", "--reason", "x")
    assert FlagChange.objects.count() == 0


def test_an_auditor_is_refused_at_every_flag_command(orders):
    member(AUDITOR, "auditor")
    commands = [
        ["flags", "--target", "orders-db", "--set", "AUTO_MIGRATE=false", "--reason", "x"],
        ["disable", "--all", "--reason", "x"],
        ["reenable", "--target", "orders-db", "--step", "1", "--reason", "x"],
    ]
    for command in commands:
        with pytest.raises(CommandError, match="auditor is not allowed to"):
            ops("--as", "auditor", *command)
    assert FlagChange.objects.count() == 0
    assert Target.objects.get(pk=orders.pk).auto_migrate is True
