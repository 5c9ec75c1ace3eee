"""End to end through a real Celery worker process and Redis."""

import datetime as dt
import time

import pytest
from django.urls import reverse

from migrations_ops.models import AuditEvent, Operation, OperationStatus
from tests.factories import ON_CALL_PERMISSIONS, TargetFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

FINAL = (OperationStatus.SUCCEEDED, OperationStatus.FAILED, OperationStatus.LOST)


def wait_until_finished(operation: Operation, seconds: float = 20) -> Operation:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        operation.refresh_from_db()
        if operation.is_finished:
            return operation
        time.sleep(0.05)
    raise AssertionError(f"operation #{operation.pk} still {operation.status} after {seconds} s")


def test_admin_force_unlock_runs_on_the_worker(real_worker, pg_target, client):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20), locked_by="deploy-99")
    target = TargetFactory(db=pg_target)
    user = UserFactory(permissions=ON_CALL_PERMISSIONS)
    client.force_login(user)

    response = client.post(
        reverse("admin:migrations_ops_target_changelist"),
        {"action": "force_unlock", "_selected_action": [target.pk]},
    )
    confirm_url = reverse("admin:migrations_ops_target_force_unlock", args=[target.pk])
    assert response.status_code == 302 and response["Location"] == confirm_url
    response = client.post(confirm_url, {"reason": "deploy-99 crashed mid-migration"})

    operation = Operation.objects.get(target=target)
    assert response.status_code == 302
    assert response["Location"] == reverse(
        "admin:migrations_ops_operation_change", args=[operation.pk]
    )
    operation = wait_until_finished(operation)

    assert operation.status == OperationStatus.SUCCEEDED, operation.error
    assert operation.worker.startswith("test-")  # run by the worker process, not in-process
    assert pg_target.runbook_lock_rows() == []
    assert operation.result["before"]["holder"] == "deploy-99"
    events = AuditEvent.objects.filter(operation=operation).order_by("id")
    assert [(e.action, e.door, e.actor_name) for e in events] == [
        ("operation.requested", "admin", user.username),
        ("operation.succeeded", "task", f"worker:{operation.worker}"),
    ]


def test_a_duplicated_task_message_runs_the_release_once(real_worker, pg_target, sqlite_target):
    """Two more deliveries of a finished operation's task: both find it claimed, do nothing."""
    from migrations_ops import services
    from migrations_ops.actors import Actor
    from migrations_ops.tasks import execute_operation_task

    operator = Actor.shell_operator()
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20), locked_by="crashed")
    target = TargetFactory(db=pg_target)
    operation = services.request_force_unlock(actor=operator, target=target, reason="stuck")
    assert wait_until_finished(operation).status == OperationStatus.SUCCEEDED
    pg_target.take_runbook_lock(locked_by="healthy-deploy")

    execute_operation_task.delay(operation.pk)
    execute_operation_task.delay(operation.pk)
    # The solo worker takes its queue in order: once a later operation has finished, the
    # duplicates before it have been handled.
    sqlite_target.create_runbook_books(lock_age=dt.timedelta(minutes=20))
    barrier = services.request_force_unlock(
        actor=operator, target=TargetFactory(db=sqlite_target), reason="barrier"
    )
    assert wait_until_finished(barrier).status == OperationStatus.SUCCEEDED

    assert pg_target.runbook_lock_rows() == [(1, "healthy-deploy")]
    assert AuditEvent.objects.filter(operation=operation, action="operation.succeeded").count() == 1
    worker_log = real_worker["log_path"].read_text()
    assert worker_log.count(f"operation {operation.pk} was not queued any more") == 2


def test_beat_reads_every_target_so_a_lock_released_by_its_holder_shows_free(
    pg_target, sqlite_target, settings
):
    from migrations_ops.models import LockObservation
    from migrations_ops.tasks import observe_targets_task

    pg_target.create_runbook_books(lock_age=dt.timedelta(seconds=5))
    sqlite_target.create_runbook_books()
    TargetFactory(name="orders", db=pg_target)
    TargetFactory(name="billing", db=sqlite_target)
    assert observe_targets_task() == 2
    assert LockObservation.objects.get(target__name="orders").held is True
    assert LockObservation.objects.get(target__name="billing").held is False

    pg_target.execute("DELETE FROM migration_lock")  # the deploy finished and let go
    observe_targets_task()

    assert LockObservation.objects.get(target__name="orders").held is False
    assert "observe-targets" in settings.CELERY_BEAT_SCHEDULE


def test_a_worker_busy_with_a_long_rollback_is_still_seen_alive(
    real_worker, pg_target, tmp_path, settings
):
    """The liveness heartbeat beats from a thread of its own: the solo pool running a 3 s
    statement does not silence the worker (it beats every second in tests)."""
    from migrations_ops import selectors, services
    from migrations_ops.actors import Actor
    from tests.migrations_ops.test_services_sweep import rollback_target

    settings.WORKER_SEEN_WITHIN = 2
    target = rollback_target(pg_target, tmp_path, down_first="SELECT pg_sleep(3);")
    deadline = time.monotonic() + 10
    while not selectors.worker_liveness().alive:  # its row is back after the last test's flush
        assert time.monotonic() < deadline, "the real worker never showed as alive"
        time.sleep(0.1)

    operation = services.request_rollback(
        actor=Actor.shell_operator(), target=target, reason="bad column"
    )
    seen_while_busy = []
    while (status := Operation.objects.get(pk=operation.pk).status) not in FINAL:
        if status == OperationStatus.RUNNING:
            seen_while_busy.append([w.hostname for w in selectors.worker_liveness().alive])
        time.sleep(0.2)

    assert wait_until_finished(operation).status == OperationStatus.SUCCEEDED, operation.error
    assert len(seen_while_busy) >= 10  # polled through the 3 s statement
    assert all(alive == [operation.worker] for alive in seen_while_busy), seen_while_busy
