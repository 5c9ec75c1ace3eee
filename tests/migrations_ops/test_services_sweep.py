"""The sweeper: queued operations sent again, operations of dead workers marked lost; the
heartbeat that tells the two apart; the soft time limit. Real databases, Redis and workers."""

import datetime as dt
import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.core.management import call_command
from django.db import connection as console_connection
from django.utils import timezone

from migrations_ops import engine, services
from migrations_ops.actors import Actor
from migrations_ops.models import AuditEvent, Operation, OperationKind, OperationStatus
from tests.broker import broker_down
from tests.factories import TargetFactory
from tests.scripts_folder import EMAIL, USERS, apply_directly, write_folder
from tests.targets import new_sqlite_target
from tests.worker import ROOT

pytestmark = pytest.mark.django_db

OPERATOR = Actor.shell_operator()


# --- helpers ---------------------------------------------------------------------------------
def catalog_of(target_db):
    with engine.connect(target_db.url, schema=target_db.schema) as connection:
        return engine.snapshot(connection)


def books_of(target_db):
    return [row[0] for row in target_db.query("SELECT filename FROM migrations ORDER BY filename")]


def rollback_target(target_db, folder, *, down_first: str = ""):
    """001 and 002 applied (their SQL really run); rolling back 002 runs ``down_first`` before
    dropping the email column."""
    target_db.create_runbook_books()
    apply_directly(target_db, USERS, EMAIL)
    target = TargetFactory(db=target_db, max_retries=0)
    email = (EMAIL[0], EMAIL[1], f"{down_first}\n{EMAIL[2]}" if down_first else EMAIL[2])
    services.import_scripts(
        actor=OPERATOR, target=target, directory=write_folder(folder, USERS, email)
    )
    return target


def wait_until(condition, seconds: float = 20, what: str = "the condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not met after {seconds} s")


def wait_until_finished(operation: Operation, seconds: float = 20) -> Operation:
    def finished():
        operation.refresh_from_db()
        return operation.is_finished

    wait_until(finished, seconds, f"operation #{operation.pk} finished")
    return operation


def later(seconds: float) -> dt.datetime:
    return timezone.now() + dt.timedelta(seconds=seconds)


def backdate(operation: Operation, **ago: float) -> None:
    """Set the operation's timestamps (``requested_at=120``: two minutes ago)."""
    now = timezone.now()
    Operation.objects.filter(pk=operation.pk).update(
        **{name: now - dt.timedelta(seconds=seconds) for name, seconds in ago.items()}
    )


def make_operation(status, *, kind=OperationKind.VERIFY, target=None, **ago) -> Operation:
    operation = Operation.objects.create(
        kind=kind,
        target=target or TargetFactory(),
        status=status,
        requested_by_name="someone",
        door="cli",
        reason="test",
        worker="w1@host" if status == OperationStatus.RUNNING else "",
    )
    backdate(operation, **ago)
    operation.refresh_from_db()
    return operation


def sessions_sleeping(target_db) -> int:
    """Sessions of the target's database running the slow down migration right now."""
    return target_db.query(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state = 'active' AND query LIKE 'SELECT pg_sleep(30)%%'"
    )[0][0]


@pytest.fixture
def dead_client_detection(targets_database_url):
    """Make the targets' server notice within 0.1 s that a client has gone, even in the middle
    of a statement (by default it notices when the statement ends)."""
    database = targets_database_url.rsplit("/", 1)[1]
    setting = "client_connection_check_interval"
    with engine.connect(targets_database_url) as connection:
        connection.execute(f"ALTER DATABASE {connection.quote(database)} SET {setting} = 100")
    yield
    with engine.connect(targets_database_url) as connection:
        connection.execute(f"ALTER DATABASE {connection.quote(database)} RESET {setting}")


# --- a worker killed mid-rollback --------------------------------------------------------------
@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_rollback_leaves_the_target_unchanged_and_is_marked_lost(
    pg_target, tmp_path, start_worker, dead_client_detection, settings
):
    target = rollback_target(pg_target, tmp_path, down_first="SELECT pg_sleep(30);")
    catalog_before, books_before = catalog_of(pg_target), books_of(pg_target)
    process, log_path = start_worker()

    operation = services.request_rollback(actor=OPERATOR, target=target, reason="bad column")

    def running_on_the_target():
        operation.refresh_from_db()
        return operation.status == OperationStatus.RUNNING and sessions_sleeping(pg_target)

    wait_until(running_on_the_target, what="the rollback running its slow statement")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    # The server rolls the dead worker's transaction back once it sees the client gone.
    wait_until(lambda: sessions_sleeping(pg_target) == 0, 10, "the orphaned session ended")
    assert catalog_of(pg_target) == catalog_before
    assert books_of(pg_target) == books_before
    holder = f"opsconsole operation #{operation.pk} (" + OPERATOR.name + ")"
    assert pg_target.runbook_lock_rows() == [(1, holder)]  # committed before the rollback ran

    assert services.sweep_operations().lost == []  # silent for less than OPERATION_LOST_AFTER
    report = services.sweep_operations(now=later(settings.OPERATION_LOST_AFTER + 1))

    assert [lost.operation_id for lost in report.lost] == [operation.pk]
    lost = report.lost[0]
    assert lost.lock == "ours"
    assert f"still held by this operation ({holder})" in lost.lock_note
    assert "force-release it" in lost.lock_note
    assert lost.lock_note in "\n".join(report.lines())
    operation.refresh_from_db()
    assert operation.status == OperationStatus.LOST
    assert operation.finished_at is not None
    assert f"lost: no heartbeat from {operation.worker} since" in operation.error
    assert operation.worker.startswith("test-")
    assert "marked lost by worker:sweeper" in operation.log
    assert lost.lock_note in operation.log
    event = AuditEvent.objects.get(operation=operation, action="operation.lost")
    assert (event.actor_name, event.door) == ("worker:sweeper", "task")
    assert event.details["lock"] == "ours"
    # Nothing else happened to the target, and a later sweep leaves the lost operation alone.
    assert catalog_of(pg_target) == catalog_before
    assert services.sweep_operations(now=later(settings.OPERATION_LOST_AFTER + 60)).lost == []
    assert "operation.succeeded" not in log_path.read_text()


# --- the outbox: sent again ----------------------------------------------------------------------
@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_an_operation_kept_while_the_broker_was_down_is_sent_again_and_runs_once(
    real_worker, pg_target, tmp_path, settings
):
    target = rollback_target(pg_target, tmp_path)
    with broker_down():
        operation = services.request_rollback(actor=OPERATOR, target=target, reason="bad column")
        operation.refresh_from_db()
        assert operation.status == OperationStatus.QUEUED
        assert "could not reach the task broker" in operation.log
        report = services.sweep_operations(now=later(settings.OUTBOX_RESEND_AFTER + 1))
        assert (report.resent, report.unsent) == ([], [operation.pk])
    assert services.sweep_operations().resent == []  # queued for less than OUTBOX_RESEND_AFTER

    # Backdated rather than a sweep "from the future": that sweep would also find the worker's
    # fresh heartbeat old and could mark the operation lost while it runs.
    backdate(operation, requested_at=settings.OUTBOX_RESEND_AFTER + 1)
    report = services.sweep_operations()

    assert report.resent == [operation.pk]
    operation = wait_until_finished(operation)
    assert operation.status == OperationStatus.SUCCEEDED, operation.error
    assert operation.worker.startswith("test-")  # the shared worker, through Redis
    assert books_of(pg_target) == ["001_create_users.sql"]
    assert services.sweep_operations(now=later(settings.OUTBOX_RESEND_AFTER + 1)).resent == []
    actions = list(AuditEvent.objects.filter(operation=operation).values_list("action", flat=True))
    # The outage is on the trail too: the request's send and the sweep's while down failed.
    assert sorted(actions) == [
        "operation.requested",
        "operation.resent",
        "operation.send_failed",
        "operation.send_failed",
        "operation.succeeded",
    ]


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_an_operation_sent_three_times_runs_its_sql_once(
    pg_target, tmp_path, start_worker, settings
):
    pg_target.execute("CREATE TABLE rollback_runs (n INTEGER)")
    target = rollback_target(
        pg_target, tmp_path, down_first="INSERT INTO rollback_runs VALUES (1);"
    )
    operation = services.request_rollback(actor=OPERATOR, target=target, reason="bad column")
    backdate(operation, requested_at=settings.OUTBOX_RESEND_AFTER + 60)

    assert services.sweep_operations().resent == [operation.pk]
    assert services.sweep_operations().resent == []  # sent again less than a period ago
    assert services.sweep_operations(now=later(settings.OUTBOX_RESEND_AFTER + 1)).resent == [
        operation.pk
    ]
    _, log_path = start_worker()  # three messages wait for it

    operation = wait_until_finished(operation)
    duplicates = f"operation {operation.pk} was not queued any more"
    wait_until(lambda: log_path.read_text().count(duplicates) == 2, what="both duplicates handled")
    assert operation.status == OperationStatus.SUCCEEDED, operation.error
    assert pg_target.query("SELECT count(*) FROM rollback_runs") == [(1,)]
    assert books_of(pg_target) == ["001_create_users.sql"]
    assert AuditEvent.objects.filter(operation=operation, action="operation.resent").count() == 2
    assert AuditEvent.objects.filter(operation=operation, action="operation.succeeded").count() == 1


# --- the heartbeat -------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_the_heartbeat_advances_and_writes_the_log_while_an_operation_runs(
    pg_target, tmp_path, settings
):
    settings.OPERATION_HEARTBEAT_SECONDS = 0.1
    target = rollback_target(pg_target, tmp_path, down_first="SELECT pg_sleep(1);")
    seen, logs, done = [], [], threading.Event()

    def watch():
        try:
            while not done.is_set():
                for beat, log in Operation.objects.filter(
                    status=OperationStatus.RUNNING
                ).values_list("heartbeat_at", "log"):
                    seen.append(beat)
                    logs.append(log)
                time.sleep(0.05)
        finally:
            console_connection.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # Tasks run in-process here: the rollback has finished when the request returns.
        operation = services.request_rollback(actor=OPERATOR, target=target, reason="bad column")
    finally:
        done.set()
        watcher.join()

    operation.refresh_from_db()
    assert operation.status == OperationStatus.SUCCEEDED, operation.error
    beats = sorted(set(seen))
    assert len(beats) >= 4, beats
    assert beats[0] >= operation.started_at
    assert beats[-1] - beats[0] >= dt.timedelta(seconds=0.5)
    assert operation.heartbeat_at <= operation.finished_at
    assert not [t for t in threading.enumerate() if t.name.startswith("heartbeat-operation-")]
    time.sleep(0.3)
    assert Operation.objects.get(pk=operation.pk).heartbeat_at == operation.heartbeat_at
    # The page showed the log growing while it ran, and the final log has each line once.
    assert any("took the migration lock" in log for log in logs)
    assert not any("succeeded" in log for log in logs)
    assert operation.log.count("took the migration lock") == 1
    assert operation.log.count("requested by") == 1


# --- what the sweeper leaves alone, and what it says ----------------------------------------------
def test_the_sweeper_leaves_healthy_running_and_recent_queued_operations_alone(own_queue):
    healthy = make_operation(OperationStatus.RUNNING, started_at=600, heartbeat_at=5)
    fresh = make_operation(OperationStatus.QUEUED, requested_at=10)
    just_approved = make_operation(OperationStatus.QUEUED, requested_at=1800, decided_at=10)
    stuck = make_operation(OperationStatus.QUEUED, requested_at=300)
    silent = make_operation(OperationStatus.RUNNING, started_at=600, heartbeat_at=120)

    report = services.sweep_operations()

    assert (report.resent, report.unsent) == ([stuck.pk], [])
    assert [lost.operation_id for lost in report.lost] == [silent.pk]
    assert report.lost[0].lock == ""  # a verify takes no lock: none read
    for untouched in (healthy, fresh, just_approved):
        before = untouched
        after = Operation.objects.get(pk=untouched.pk)
        assert (after.status, after.heartbeat_at, after.log) == (
            before.status,
            before.heartbeat_at,
            before.log,
        )
    assert "sends it again" in Operation.objects.get(pk=stuck.pk).log
    assert Operation.objects.get(pk=silent.pk).status == OperationStatus.LOST
    again = services.sweep_operations()
    assert (again.resent, again.lost) == ([], [])


def test_a_lost_operations_lock_is_reported_for_what_it_is(tmp_path, sqlite_target):
    knex = sqlite_target
    knex.create_knex_books(locked=True)
    runbook = new_sqlite_target(tmp_path)
    runbook.create_runbook_books(lock_age=dt.timedelta(minutes=1), locked_by="deploy-7")
    lost = [
        make_operation(
            OperationStatus.RUNNING,
            kind=OperationKind.ROLLBACK,
            target=target,
            started_at=600,
            heartbeat_at=600,
        )
        for target in (
            TargetFactory(db=knex, convention="knex"),
            TargetFactory(db=runbook),
            TargetFactory(),  # its database does not exist
        )
    ]

    report = services.sweep_operations()

    assert [(x.operation_id, x.lock) for x in report.lost] == [
        (lost[0].pk, "maybe_ours"),
        (lost[1].pk, "other"),
        (lost[2].pk, "unknown"),
    ]
    notes = [x.lock_note for x in report.lost]
    assert "its table names no holder" in notes[0] and "may be this operation's" in notes[0]
    assert "held by deploy-7, not by this operation" in notes[1]
    assert "could not read the migration lock" in notes[2]
    assert knex.knex_is_locked() == 1
    assert runbook.runbook_lock_rows() == [(1, "deploy-7")]


# --- the soft time limit -------------------------------------------------------------------------
def test_the_soft_time_limit_fails_a_running_rollback_cleanly(pg_target, tmp_path):
    target = rollback_target(pg_target, tmp_path, down_first="SELECT pg_sleep(3);")
    catalog_before, books_before = catalog_of(pg_target), books_of(pg_target)
    operation = services.request_rollback(actor=OPERATOR, target=target, reason="bad column")

    def soft_time_limit(signum, frame):  # what Celery's pool does when the soft limit passes
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGALRM, soft_time_limit)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        started = time.monotonic()
        operation = services.execute_operation(operation.pk, worker="test-worker")
        elapsed = time.monotonic() - started
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    assert operation.status == OperationStatus.FAILED
    assert elapsed < 2.5  # it did not wait for the statement to end
    assert "stopped by the time limit: still running after" in operation.error
    assert "rolls its open transaction back" in operation.error
    assert "still held by this operation" in operation.error  # the release could not run
    assert catalog_of(pg_target) == catalog_before
    assert books_of(pg_target) == books_before


# --- the doors ------------------------------------------------------------------------------------
def test_ops_sweep_prints_what_it_did(own_queue):
    stuck = make_operation(OperationStatus.QUEUED, requested_at=300)
    silent = make_operation(OperationStatus.RUNNING, started_at=600, heartbeat_at=600)
    out = io.StringIO()

    call_command("ops", "sweep", stdout=out)

    lines = out.getvalue().splitlines()
    assert lines[0] == f"operation #{stuck.pk}: still queued, sent again"
    assert lines[1].startswith(f"operation #{silent.pk} (verify on {silent.target.name}): ")
    assert "marked lost, no heartbeat from w1@host since" in lines[1]
    assert lines[-1] == "sweep: 1 sent again, 0 still unsent, 1 marked lost"
    event = AuditEvent.objects.get(operation=silent, action="operation.lost")
    assert (event.actor_name, event.door) == (OPERATOR.name, "cli")


@pytest.mark.django_db(transaction=True)  # beat closes connections left in a transaction
def test_beat_runs_the_sweep_task_from_the_database_schedule(settings):
    from django_celery_beat.models import PeriodicTask
    from django_celery_beat.schedulers import DatabaseScheduler

    from migrations_ops.tasks import sweep_operations_task
    from opsconsole.celery import app

    DatabaseScheduler(app=app)  # what `celery beat` does as it starts
    entry = PeriodicTask.objects.get(name="sweep-operations")
    assert entry.task == sweep_operations_task.name == "migrations_ops.sweep_operations"
    assert entry.interval.every == settings.OPERATION_SWEEP_INTERVAL
    assert entry.interval.period == "seconds"

    silent = make_operation(OperationStatus.RUNNING, started_at=600, heartbeat_at=600)
    result = sweep_operations_task.delay().get()  # in-process here
    assert [lost["operation"] for lost in result["lost"]] == [silent.pk]


def test_time_limits_and_visibility_timeout_follow_one_setting():
    code = (
        "import django; django.setup(); from opsconsole.celery import app; c = app.conf; "
        "print(c.task_soft_time_limit, c.task_time_limit, "
        "c.broker_transport_options['visibility_timeout'], c.task_acks_late, "
        "c.task_reject_on_worker_lost, c.worker_prefetch_multiplier)"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "opsconsole.settings"}
    env["OPERATION_SOFT_TIME_LIMIT"] = "100"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["100", "160", "460", "True", "True", "1"]
