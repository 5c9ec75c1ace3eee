"""The runbook's drills, for real on sandbox targets: the fault made by a real process or a
real migration, the procedure through the console's own services, the drill incident scored
and closed, and drills kept out of the real incident figures."""

import datetime as dt
import io
import json

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from incidents import selectors, services
from incidents.drills import snapshot
from incidents.models import (
    CheckResult,
    Drill,
    DrillKind,
    DrillRun,
    DrillRunStatus,
    Incident,
    IncidentStatus,
)
from migrations_ops import engine
from migrations_ops import selectors as ops_selectors
from migrations_ops import services as ops
from migrations_ops.actors import Actor
from migrations_ops.models import Environment, FlagStage, Operation, OperationKind
from tests.factories import TargetFactory, UserFactory
from tests.scripts_folder import EMAIL, USERS, apply_directly, write_folder

pytestmark = pytest.mark.django_db

OPERATOR = Actor.shell_operator()


def sandbox_of(db, tmp_path, name="sandbox") -> object:
    """A sandbox target with the runbook's books, both scripts applied and imported."""
    db.create_runbook_books()
    apply_directly(db, USERS, EMAIL)
    target = TargetFactory(db=db, name=name, environment=Environment.SANDBOX)
    ops.import_scripts(
        actor=OPERATOR, target=target, directory=write_folder(tmp_path / name, USERS, EMAIL)
    )
    target.db = db
    return target


@pytest.fixture
def pg_sandbox(pg_target, tmp_path):
    return sandbox_of(pg_target, tmp_path)


@pytest.fixture
def sqlite_sandbox(sqlite_target, tmp_path):
    return sandbox_of(sqlite_target, tmp_path)


def lock_of(target) -> engine.LockState:
    return ops.read_target_status(target, include_applied=False).observation


# --- scheduling -------------------------------------------------------------------------------
def test_scheduling_creates_the_periodic_task_with_the_runbooks_crontab(pg_sandbox):
    monthly = services.schedule_drill(
        actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=pg_sandbox
    )
    quarterly = services.schedule_drill(actor=OPERATOR, kind=DrillKind.ROLLBACK, target=pg_sandbox)

    task = PeriodicTask.objects.get(pk=monthly.periodic_task_id)
    assert task.task == "incidents.tasks.run_scheduled_drill"
    assert json.loads(task.args) == [monthly.pk]
    assert task.enabled
    cron = task.crontab
    assert (cron.minute, cron.hour, cron.day_of_month, cron.month_of_year) == ("0", "3", "1", "*")
    assert str(cron.timezone) == "UTC"
    cron = PeriodicTask.objects.get(pk=quarterly.periodic_task_id).crontab
    assert (cron.day_of_month, cron.month_of_year) == ("1", "1,4,7,10")

    # Disabling the drill disables its task; scheduling again keeps one drill and one task.
    again = services.schedule_drill(
        actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=pg_sandbox, enabled=False
    )
    assert again.pk == monthly.pk
    assert not PeriodicTask.objects.get(pk=monthly.periodic_task_id).enabled
    assert PeriodicTask.objects.filter(task="incidents.tasks.run_scheduled_drill").count() == 2


def test_a_drill_is_refused_on_a_target_that_is_not_sandbox(pg_target):
    pg_target.create_runbook_books()
    staging = TargetFactory(db=pg_target, name="shop", environment=Environment.STAGING)

    with pytest.raises(ops.ServiceError, match="shop is a staging target: drills are scheduled"):
        services.schedule_drill(actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=staging)
    assert not Drill.objects.exists()
    assert not PeriodicTask.objects.filter(task="incidents.tasks.run_scheduled_drill").exists()

    # A drill row made before the target left the sandbox is refused too, nothing done.
    drill = Drill.objects.create(kind=DrillKind.LOCK_RELEASE, target=staging)
    with pytest.raises(ops.ServiceError, match="drills run only on a sandbox target"):
        services.run_drill(actor=OPERATOR, drill=drill)
    assert not DrillRun.objects.exists()
    assert not Incident.objects.exists()
    assert not Operation.objects.exists()
    assert pg_target.runbook_lock_rows() == []


def test_a_second_run_on_the_same_target_is_refused_while_one_runs(pg_sandbox):
    lock = services.schedule_drill(actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=pg_sandbox)
    rollback = services.schedule_drill(actor=OPERATOR, kind=DrillKind.ROLLBACK, target=pg_sandbox)
    running = services.start_drill(actor=OPERATOR, drill=lock)

    with pytest.raises(ops.ServiceError, match=f"drill run #{running.pk} .* is still running"):
        services.run_drill(actor=OPERATOR, drill=rollback)
    assert DrillRun.objects.count() == 1


def test_running_a_drill_needs_the_permission(pg_sandbox):
    drill = services.schedule_drill(actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=pg_sandbox)
    viewer = Actor.for_user(UserFactory(username="viewer"), "cli")
    with pytest.raises(ops.PermissionDenied):
        services.run_drill(actor=viewer, drill=drill)
    assert not DrillRun.objects.exists()


# --- the lock release drill -------------------------------------------------------------------
def test_lock_release_drill_frees_a_lock_left_by_a_killed_process(pg_sandbox):
    drill = services.schedule_drill(actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=pg_sandbox)

    run = services.run_drill(actor=OPERATOR, drill=drill)

    assert run.status == DrillRunStatus.SUCCEEDED, run.error
    assert "took the lock of sandbox and was killed" in run.log
    assert pg_sandbox.db.runbook_lock_rows() == []
    assert not lock_of(pg_sandbox).held
    assert 0 < run.detect_seconds <= run.mitigate_seconds <= run.recover_seconds
    assert run.met_objectives is True  # well within the runbook's minutes

    incident = run.incident
    assert incident.is_drill
    assert incident.status == IncidentStatus.CLOSED
    assert list(incident.affected_targets.all()) == [pg_sandbox]
    assert incident.impact_started_at <= incident.detected_at <= incident.mitigated_at
    assert incident.mitigated_at <= incident.recovered_at
    assert incident.root_cause == "drill"
    assert incident.no_action_items_reason == "drill"
    assert all(item.result == CheckResult.PASSED for item in incident.checklist.all())
    unlock = Operation.objects.get(kind=OperationKind.FORCE_UNLOCK)
    assert unlock.incident == incident
    assert unlock.requested_by_name == "drill:lock_release"
    assert "pid" in unlock.result["before"]["holder"]
    texts = [entry.text for entry in incident.timeline.all()]
    assert any("Detected at" in text for text in texts)
    assert any(text.startswith("Status: Detected → Closed") for text in texts)


def test_a_drill_incident_gets_only_its_own_operations(pg_sandbox):
    real = services.open_incident(
        actor=OPERATOR,
        title="real one",
        scenario="concurrent_conflict",
        severity="sev3",
        targets=[pg_sandbox],
    )
    drill = services.schedule_drill(actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=pg_sandbox)
    run = services.run_drill(actor=OPERATOR, drill=drill)
    assert run.status == DrillRunStatus.SUCCEEDED, run.error
    # The drill's operations land on the open real incident affecting the sandbox, as any
    # operation does; a real operation afterwards never lands on a drill incident.
    ops.request_verify(actor=OPERATOR, target=pg_sandbox, reason="after the drill")
    drill_ops = {entry.operation_id for entry in run.incident.timeline.exclude(operation=None)}
    assert drill_ops == set(
        Operation.objects.filter(incident=run.incident).values_list("pk", flat=True)
    )
    later = Operation.objects.latest("pk")
    assert later.pk in set(real.timeline.values_list("operation_id", flat=True))


# --- the rollback drill -----------------------------------------------------------------------
@pytest.mark.parametrize("sandbox", ["pg_sandbox", "sqlite_sandbox"])
def test_rollback_drill_leaves_the_schema_and_flags_as_they_were(request, sandbox):
    target = request.getfixturevalue(sandbox)
    catalog_before = snapshot(target)
    flags_before = ops_selectors.flags_of(target)
    drill = services.schedule_drill(actor=OPERATOR, kind=DrillKind.ROLLBACK, target=target)

    run = services.run_drill(actor=OPERATOR, drill=drill)

    assert run.status == DrillRunStatus.SUCCEEDED, run.error
    assert engine.diff(catalog_before, snapshot(target)) == []
    target.refresh_from_db()
    assert ops_selectors.flags_of(target) == flags_before
    assert target.flag_stage == FlagStage.NORMAL
    assert sorted(target.scripts.values_list("filename", flat=True)) == [USERS[0], EMAIL[0]]
    kinds = list(
        Operation.objects.filter(target=target).order_by("pk").values_list("kind", flat=True)
    )
    assert kinds == [OperationKind.APPLY, OperationKind.ROLLBACK, OperationKind.VERIFY]
    # The fleet view's counts come from that verify: nothing of the drill's migration left.
    (row,) = [r for r in ops_selectors.fleet_overview() if r["name"] == target.name]
    assert (row["scripts"], row["applied"], row["pending"]) == (2, 2, 0)
    incident = run.incident
    assert incident.status == IncidentStatus.CLOSED
    assert incident.culprit_migration == "99990000000001_drill_rollback_probe.sql"
    assert run.detect_seconds <= run.mitigate_seconds <= run.recover_seconds
    assert run.met_objectives is True
    flag_kinds = list(target.flag_changes.order_by("pk").values_list("kind", flat=True))
    assert flag_kinds[:4] == ["emergency_disable", "reenable_1", "reenable_2", "reenable_3"]


def test_a_failed_rollback_drill_cleans_up_and_records_the_failure(pg_sandbox):
    # The drill's table is there already: applying its migration fails half-way.
    pg_sandbox.db.execute("CREATE TABLE drill_rollback_probe (id INTEGER)")
    catalog_before = snapshot(pg_sandbox)
    drill = services.schedule_drill(actor=OPERATOR, kind=DrillKind.ROLLBACK, target=pg_sandbox)

    run = services.run_drill(actor=OPERATOR, drill=drill)

    assert run.status == DrillRunStatus.FAILED
    assert "already exists" in run.error
    assert run.finished_at is not None
    assert run.met_objectives is None
    assert engine.diff(catalog_before, snapshot(pg_sandbox)) == []
    assert sorted(pg_sandbox.scripts.values_list("filename", flat=True)) == [USERS[0], EMAIL[0]]
    assert not lock_of(pg_sandbox).held


def test_the_rollback_drill_refuses_a_sandbox_with_pending_migrations(pg_sandbox, tmp_path):
    from tests.scripts_folder import ORDERS

    ops.import_scripts(
        actor=OPERATOR,
        target=pg_sandbox,
        directory=write_folder(tmp_path / "more", USERS, EMAIL, ORDERS),
    )
    drill = services.schedule_drill(actor=OPERATOR, kind=DrillKind.ROLLBACK, target=pg_sandbox)
    run = services.run_drill(actor=OPERATOR, drill=drill)
    assert run.status == DrillRunStatus.FAILED
    assert "has pending migrations (003_create_orders.sql)" in run.error
    assert not Operation.objects.filter(kind=OperationKind.APPLY).exists()


# --- kept out of the real figures -------------------------------------------------------------
def test_drills_are_kept_out_of_the_objectives_report_and_the_lessons_log(pg_sandbox):
    drill = services.schedule_drill(actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=pg_sandbox)
    run = services.run_drill(actor=OPERATOR, drill=drill)
    assert run.incident.status == IncidentStatus.CLOSED
    real = services.open_incident(
        actor=OPERATOR,
        title="real",
        scenario="concurrent_conflict",
        severity="sev2",
        targets=[pg_sandbox],
        impact_started_at=timezone.now() - dt.timedelta(hours=3),
    )

    report = selectors.objectives_report()
    assert [figures.incidents for figures in report] == [1]
    assert selectors.lessons_learned() == []
    assert list(selectors.incidents_breaching()) == [real]
    assert [i.pk for i in selectors.incidents_to_serve(pg_sandbox)] == [real.pk]
    row = next(r for r in ops_selectors.fleet_overview() if r["name"] == "sandbox")
    assert row["open_incidents"] == 1


# --- overdue ----------------------------------------------------------------------------------
def test_a_drill_is_overdue_until_it_succeeds_and_again_after_its_interval(pg_sandbox):
    drill = services.schedule_drill(actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=pg_sandbox)
    state = selectors.drill_state(drill)
    assert state.overdue and state.last_run is None and state.due_since is None

    failed = DrillRun.objects.create(
        drill=drill, status=DrillRunStatus.FAILED, started_by="x", finished_at=timezone.now()
    )
    state = selectors.drill_state(drill)
    assert state.overdue and state.last_run == failed

    finished = timezone.now() - dt.timedelta(days=30)
    DrillRun.objects.create(
        drill=drill,
        status=DrillRunStatus.SUCCEEDED,
        started_by="x",
        started_at=finished,
        finished_at=finished,
    )
    state = selectors.drill_state(drill)
    assert not state.overdue
    assert state.due_since == finished + dt.timedelta(days=31)
    assert selectors.drill_state(drill, now=finished + dt.timedelta(days=32)).overdue


# --- the doors --------------------------------------------------------------------------------
def run_cli(*args) -> str:
    out = io.StringIO()
    call_command("ops", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_cli_schedules_runs_and_lists_drills(pg_sandbox):
    scheduled = run_cli("drill", "schedule", "--kind", "lock_release", "--target", "sandbox")
    assert "Lock release (monthly) on sandbox: scheduled (cron 0 3 1 * * UTC)" in scheduled
    assert "OVERDUE" in run_cli("drill", "list")

    out = run_cli("drill", "run", "--kind", "lock_release", "--target", "sandbox")

    assert "time to detect: " in out and "time to recover: " in out
    assert "succeeded, objectives met, drill incident #" in out
    listed = run_cli("drill", "list")
    assert "last run #" in listed and "succeeded" in listed and "due 20" in listed


def test_cli_refusals_exit_non_zero(pg_target, pg_sandbox):
    TargetFactory(db=pg_target, name="shop", environment=Environment.STAGING)
    with pytest.raises(CommandError, match="shop is a staging target"):
        run_cli("drill", "schedule", "--kind", "rollback", "--target", "shop")
    with pytest.raises(CommandError, match="no rollback drill on sandbox: schedule it first"):
        run_cli("drill", "run", "--kind", "rollback", "--target", "sandbox")
    assert not DrillRun.objects.exists()


def test_admin_schedules_and_runs_a_drill_and_the_dashboard_shows_it(
    admin_client, pg_sandbox, django_capture_on_commit_callbacks
):
    staging = TargetFactory(name="shop", environment=Environment.STAGING)
    add = admin_client.get(reverse("admin:incidents_drill_add")).content.decode()
    assert f'value="{pg_sandbox.pk}"' in add and f'value="{staging.pk}"' not in add

    response = admin_client.post(
        reverse("admin:incidents_drill_add"),
        {"kind": "lock_release", "target": pg_sandbox.pk, "enabled": "on"},
    )
    assert response.status_code == 302
    drill = Drill.objects.get()
    assert drill.periodic_task.enabled

    index = admin_client.get(reverse("admin:index")).content.decode()
    assert 'id="drills"' in index and "overdue" in index and "never" in index
    drills = admin_client.get(reverse("admin:incidents_drill_changelist")).content.decode()
    assert "OVERDUE (never succeeded)" in drills

    # The run is written, then sent as a task on commit (run eagerly here).
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:incidents_drill_changelist"),
            {"action": "run_now", "_selected_action": [drill.pk]},
            follow=True,
        )
    run = DrillRun.objects.get()
    assert f">#{run.pk}</a> started" in response.content.decode()
    assert run.status == DrillRunStatus.SUCCEEDED, run.error
    index = admin_client.get(reverse("admin:index")).content.decode()
    assert "Succeeded</a>, objectives met" in index and "no, due" in index
    drills = admin_client.get(reverse("admin:incidents_drill_changelist")).content.decode()
    assert "no, due" in drills and "OVERDUE" not in drills
    page = admin_client.get(reverse("admin:incidents_drillrun_change", args=[run.pk]))
    assert (
        reverse("admin:incidents_incident_change", args=[run.incident_id]) in page.content.decode()
    )


def test_incident_changelist_shows_real_incidents_unless_asked(admin_client, pg_sandbox):
    real = services.open_incident(
        actor=OPERATOR, title="the real one", scenario="other", severity="sev3"
    )
    drill = services.open_incident(
        actor=OPERATOR, title="the drill one", scenario="other", severity="sev4", is_drill=True
    )
    url = reverse("admin:incidents_incident_changelist")
    default = admin_client.get(url).content.decode()
    assert real.title in default and drill.title not in default
    drills = admin_client.get(url, {"drills": "drills"}).content.decode()
    assert drill.title in drills and real.title not in drills
    both = admin_client.get(url, {"drills": "all"}).content.decode()
    assert drill.title in both and real.title in both


def test_the_scheduled_task_runs_an_enabled_drill_and_skips_a_disabled_one(pg_sandbox):
    from incidents.tasks import run_scheduled_drill

    drill = services.schedule_drill(
        actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=pg_sandbox, enabled=False
    )
    assert run_scheduled_drill(drill.pk) is None
    assert not DrillRun.objects.exists()

    services.schedule_drill(actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=pg_sandbox)
    assert run_scheduled_drill(drill.pk) == DrillRunStatus.SUCCEEDED
    run = DrillRun.objects.get()
    assert run.scheduled and run.started_by == "worker:drill-schedule"


def test_a_scheduled_drill_refused_is_on_the_audit_trail(pg_sandbox):
    from incidents.tasks import run_scheduled_drill
    from migrations_ops.models import AuditEvent

    drill = services.schedule_drill(actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=pg_sandbox)
    running = services.start_drill(actor=OPERATOR, drill=drill)

    answer = run_scheduled_drill(drill.pk)

    assert answer.startswith(f"refused: drill run #{running.pk}")
    event = AuditEvent.objects.get(action="refused.drill.run_scheduled")
    assert (event.actor_name, event.door) == ("worker:drill-schedule", "task")
    assert event.details["message"] == answer.removeprefix("refused: ")


def test_admin_shows_a_refused_run_as_one_line(admin_client, pg_sandbox):
    drill = services.schedule_drill(actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=pg_sandbox)
    running = services.start_drill(actor=OPERATOR, drill=drill)
    response = admin_client.post(
        reverse("admin:incidents_drill_changelist"),
        {"action": "run_now", "_selected_action": [drill.pk]},
        follow=True,
    )
    assert f"drill run #{running.pk} (lock release (monthly)) is still running" in (
        response.content.decode()
    )
    assert DrillRun.objects.count() == 1


def test_the_demo_registers_a_sandbox_with_both_drills_overdue(tmp_path):
    from migrations_ops.demo import load_demo

    result = load_demo(tmp_path / "demo")

    sandbox = next(t for t in result.targets if t.name == "sandbox-demo")
    assert sandbox.environment == Environment.SANDBOX
    states = selectors.drill_states()
    assert sorted(state.drill.kind for state in states) == ["lock_release", "rollback"]
    assert all(state.overdue and state.last_run is None for state in states)
    assert all(state.drill.periodic_task.enabled for state in states)


def test_lock_release_drill_on_a_knex_sqlite_sandbox(sqlite_target, tmp_path):
    # Knex's lock keeps no holder: the drill knows its process is gone, the table only says
    # is_locked = 1.
    sqlite_target.create_knex_books(applied=())
    target = TargetFactory(
        db=sqlite_target, name="knex-sandbox", convention="knex", environment=Environment.SANDBOX
    )
    ops.import_scripts(
        actor=OPERATOR, target=target, directory=write_folder(tmp_path / "knex", USERS)
    )
    drill = services.schedule_drill(actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=target)

    run = services.run_drill(actor=OPERATOR, drill=drill)

    assert run.status == DrillRunStatus.SUCCEEDED, run.error
    assert sqlite_target.knex_is_locked() == 0
    assert run.incident.status == IncidentStatus.CLOSED


def test_a_run_left_running_for_hours_is_taken_as_lost_and_no_longer_blocks(pg_sandbox):
    drill = services.schedule_drill(actor=OPERATOR, kind=DrillKind.LOCK_RELEASE, target=pg_sandbox)
    stuck = DrillRun.objects.create(
        drill=drill, started_by="x", started_at=timezone.now() - dt.timedelta(hours=3)
    )
    run = services.run_drill(actor=OPERATOR, drill=drill)
    assert run.status == DrillRunStatus.SUCCEEDED, run.error
    stuck.refresh_from_db()
    assert stuck.status == DrillRunStatus.FAILED and stuck.error.startswith("lost")
