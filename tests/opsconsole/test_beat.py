"""Celery beat's scheduler (opsconsole/beat.py): beat runs the sweep in its own process, so the
operations of a dead worker are marked lost with no worker left to run anything. Real ``celery
beat`` processes on the test database and Redis."""

import datetime as dt
import json
import time

import pytest
import redis
from django.utils import timezone

from migrations_ops import selectors
from migrations_ops.models import AuditEvent, Operation, OperationKind, OperationStatus
from tests.factories import TargetFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

SWEEP = "migrations_ops.sweep_operations"
OBSERVE = "migrations_ops.observe_targets"


def silent_operation(target=None, *, silent_for: float = 600) -> Operation:
    """A running verify whose worker last beat ``silent_for`` seconds ago, and died."""
    heard = timezone.now() - dt.timedelta(seconds=silent_for)
    return Operation.objects.create(
        kind=OperationKind.VERIFY,
        target=target or TargetFactory(),
        status=OperationStatus.RUNNING,
        requested_by_name="someone",
        door="cli",
        reason="test",
        worker="only-worker@host",
        requested_at=heard,
        started_at=heard,
        heartbeat_at=heard,
    )


def wait_until(condition, seconds: float = 30, what: str = "the condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not met after {seconds} s")


def all_lost(*operations: Operation) -> bool:
    pks = [operation.pk for operation in operations]
    return Operation.objects.filter(pk__in=pks, status=OperationStatus.LOST).count() == len(pks)


def task_names_queued(queue: str, broker_url: str) -> list[str]:
    """The tasks waiting in ``queue`` on Redis, by name (no worker consumes it)."""
    client = redis.Redis.from_url(broker_url)
    try:
        return [json.loads(raw)["headers"]["task"] for raw in client.lrange(queue, 0, -1)]
    finally:
        client.close()


def test_beat_marks_a_dead_workers_operation_lost_with_no_worker_running(
    start_beat, own_queue, settings
):
    operation = silent_operation()
    still_running = silent_operation(silent_for=1)  # heard from a moment ago: left alone

    log_path = start_beat()

    wait_until(lambda: all_lost(operation), what=f"operation #{operation.pk} marked lost")
    operation.refresh_from_db()
    assert "lost: no heartbeat from only-worker@host since" in operation.error
    event = AuditEvent.objects.get(operation=operation, action="operation.lost")
    assert (event.actor_name, event.door) == ("worker:sweeper", "task")
    assert event.request_id  # the in-beat run's task id
    assert Operation.objects.get(pk=still_running.pk).status == OperationStatus.RUNNING
    wait_until(lambda: f"{SWEEP}[" in log_path.read_text(), what="beat logging the sweep")
    # Run by beat's own process: its log says how the task went, under the events' request id.
    assert f"Task {SWEEP}[{event.request_id}] succeeded" in log_path.read_text()
    # The sweep never went to the queue; the lock reads still do, for the workers.
    wait_until(lambda: OBSERVE in task_names_queued(own_queue, settings.CELERY_BROKER_URL))
    assert SWEEP not in task_names_queued(own_queue, settings.CELERY_BROKER_URL)


def test_two_beats_sweeping_at_once_mark_each_operation_lost_once(start_beat):
    first, second = start_beat(), start_beat()
    # Both beats sweep every second from now on: the operations fall silent under both.
    operations = [silent_operation() for _ in range(20)]

    wait_until(lambda: all_lost(*operations), what="every operation marked lost")
    time.sleep(2)  # two more sweeps from each beat: nothing more to do

    for operation in operations:
        assert AuditEvent.objects.filter(operation=operation, action="operation.lost").count() == 1
        assert Operation.objects.get(pk=operation.pk).log.count("marked lost by") == 1
    assert f"{SWEEP}[" in first.read_text() and f"{SWEEP}[" in second.read_text()
    _, problems = selectors.verify_audit_chain()
    assert problems == []


def test_the_scheduler_runs_the_sweep_here_and_sends_other_tasks_to_the_workers(
    own_queue, settings
):
    from celery.result import EagerResult
    from django_celery_beat.models import PeriodicTask

    from opsconsole.beat import ConsoleScheduler
    from opsconsole.celery import app

    assert app.conf.beat_scheduler == "opsconsole.beat:ConsoleScheduler"
    app.loader.import_default_modules()  # what `celery beat` does as it starts: the tasks
    scheduler = ConsoleScheduler(app=app)
    assert PeriodicTask.objects.get(name="sweep-operations").task == SWEEP
    silent = silent_operation()

    # What beat does with a due entry (Scheduler.apply_entry).
    swept = scheduler.apply_async(scheduler.schedule["sweep-operations"], advance=False)
    observed = scheduler.apply_async(scheduler.schedule["observe-targets"], advance=False)

    assert isinstance(swept, EagerResult) and swept.successful()
    assert [lost["operation"] for lost in swept.result["lost"]] == [silent.pk]
    assert Operation.objects.get(pk=silent.pk).status == OperationStatus.LOST
    assert not isinstance(observed, EagerResult)
    assert task_names_queued(own_queue, settings.CELERY_BROKER_URL) == [OBSERVE]
