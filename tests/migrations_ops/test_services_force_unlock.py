"""Force-unlock through the service layer: the rules every door inherits."""

import datetime as dt
import threading
import time

import pytest
from django.db import IntegrityError
from django.db import connection as console_connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import (
    AuditEvent,
    Door,
    Environment,
    LockObservation,
    Operation,
    OperationStatus,
)
from tests.broker import broker_down
from tests.factories import ON_CALL_PERMISSIONS, TargetFactory, UserFactory

pytestmark = pytest.mark.django_db

STALE = dt.timedelta(minutes=20)


@pytest.fixture
def engineer():
    return Actor.for_user(UserFactory(permissions=ON_CALL_PERMISSIONS), Door.ADMIN)


def request_and_run(django_capture_on_commit_callbacks, **kwargs):
    with django_capture_on_commit_callbacks(execute=True):
        operation = services.request_force_unlock(**kwargs)
    operation.refresh_from_db()
    return operation


def test_stale_runbook_lock_is_released_and_recorded(
    any_target, engineer, django_capture_on_commit_callbacks
):
    any_target.create_runbook_books(lock_age=STALE, locked_by="deploy-42")
    target = TargetFactory(db=any_target)

    operation = request_and_run(
        django_capture_on_commit_callbacks,
        actor=engineer,
        target=target,
        reason="deploy-42 crashed",
    )

    assert any_target.runbook_lock_rows() == []
    assert operation.status == OperationStatus.SUCCEEDED
    assert operation.requested_by == engineer.user
    assert operation.started_at <= operation.finished_at
    before = operation.result["before"]
    assert before["held"] is True
    assert before["holder"] == "deploy-42"
    assert before["rows"][0]["locked_by"] == "deploy-42"
    assert operation.result["after"]["held"] is False
    actions = list(
        AuditEvent.objects.filter(operation=operation).order_by("id").values_list("action", "door")
    )
    assert actions == [("operation.requested", "admin"), ("operation.succeeded", "task")]
    assert LockObservation.objects.get(target=target).held is False


def test_knex_lock_needs_force_until_seen_held_longer_than_the_timeout(
    any_target, engineer, django_capture_on_commit_callbacks
):
    any_target.create_knex_books(locked=True)
    target = TargetFactory(db=any_target, convention="knex")

    with pytest.raises(services.ServiceError, match="its real age is unknown"):
        services.request_force_unlock(actor=engineer, target=target, reason="stuck")
    assert any_target.knex_is_locked() == 1
    assert Operation.objects.count() == 0

    # Seen held continuously for longer than the lock timeout: stale by the console's clock.
    observation = target.lock_observation
    observation.first_seen_held_at = timezone.now() - STALE
    observation.save()
    operation = request_and_run(
        django_capture_on_commit_callbacks, actor=engineer, target=target, reason="stuck"
    )
    assert operation.status == OperationStatus.SUCCEEDED
    assert any_target.knex_is_locked() == 0


def test_fresh_lock_needs_explicit_release_fresh(
    pg_target, engineer, django_capture_on_commit_callbacks
):
    pg_target.create_runbook_books(lock_age=dt.timedelta(seconds=5))
    target = TargetFactory(db=pg_target)

    with pytest.raises(services.ServiceError, match=r"not stale .*lock timeout 60 s"):
        services.request_force_unlock(actor=engineer, target=target, reason="impatient")
    assert len(pg_target.runbook_lock_rows()) == 1

    operation = request_and_run(
        django_capture_on_commit_callbacks,
        actor=engineer,
        target=target,
        reason="holder pod was evicted",
        release_fresh=True,
    )
    assert operation.status == OperationStatus.SUCCEEDED
    assert operation.params["release_fresh"] is True
    assert pg_target.runbook_lock_rows() == []


@pytest.mark.parametrize("reason", ["", "   "])
def test_reason_is_required(pg_target, engineer, reason):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target)
    with pytest.raises(services.ServiceError, match="a reason is required"):
        services.request_force_unlock(actor=engineer, target=target, reason=reason)
    assert Operation.objects.count() == 0
    assert len(pg_target.runbook_lock_rows()) == 1


def test_user_without_permission_is_refused(pg_target):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target)
    viewer = Actor.for_user(UserFactory(permissions=["migrations_ops.view_target"]), Door.API)
    with pytest.raises(services.PermissionDenied, match="not allowed to force-release"):
        services.request_force_unlock(actor=viewer, target=target, reason="x")
    assert Operation.objects.count() == 0
    assert len(pg_target.runbook_lock_rows()) == 1


def test_inactive_user_is_refused_even_with_permission(pg_target):
    pg_target.create_runbook_books(lock_age=STALE)
    user = UserFactory(permissions=ON_CALL_PERMISSIONS, is_active=False)
    with pytest.raises(services.PermissionDenied):
        services.request_force_unlock(
            actor=Actor.for_user(user, Door.ADMIN), target=TargetFactory(db=pg_target), reason="x"
        )


def test_production_needs_the_typed_name(pg_target, engineer, django_capture_on_commit_callbacks):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target, name="orders-prod", environment=Environment.PRODUCTION)
    for typed in (None, "", "orders-staging"):
        with pytest.raises(services.ServiceError, match="production target: type its name"):
            services.request_force_unlock(
                actor=engineer, target=target, reason="stuck", confirm_name=typed
            )
    assert len(pg_target.runbook_lock_rows()) == 1
    operation = request_and_run(
        django_capture_on_commit_callbacks,
        actor=engineer,
        target=target,
        reason="stuck",
        confirm_name="orders-prod",
    )
    # An on-call engineer may only ask on production: a second person approves.
    assert operation.status == OperationStatus.AWAITING_APPROVAL
    assert len(pg_target.runbook_lock_rows()) == 1


def test_lock_not_held_is_refused(any_target, engineer):
    any_target.create_runbook_books()
    target = TargetFactory(db=any_target)
    with pytest.raises(services.ServiceError, match="is not held: nothing to release"):
        services.request_force_unlock(actor=engineer, target=target, reason="x")
    assert Operation.objects.count() == 0


def test_missing_tables_are_refused(any_target, engineer):
    target = TargetFactory(db=any_target)
    with pytest.raises(services.ServiceError, match="not a runbook-convention migrations database"):
        services.request_force_unlock(actor=engineer, target=target, reason="x")
    assert Operation.objects.count() == 0


def test_unreachable_target_answers_within_the_connect_timeout(engineer):
    target = TargetFactory(connection_url="postgresql://app:s3cr3t-marker@127.0.0.1:1/app")
    started = time.monotonic()
    with pytest.raises(services.ServiceError) as caught:
        services.request_force_unlock(actor=engineer, target=target, reason="x")
    assert time.monotonic() - started < 3
    message = str(caught.value)
    assert "cannot connect to target" in message
    assert "\n" not in message
    assert "s3cr3t-marker" not in message
    assert Operation.objects.count() == 0
    assert target.lock_observation.held is None
    assert "s3cr3t-marker" not in target.lock_observation.error


def test_lock_retaken_between_request_and_execution_is_left_alone(pg_target, engineer):
    pg_target.create_runbook_books(lock_age=STALE, locked_by="crashed-deploy")
    target = TargetFactory(db=pg_target)
    # The task is not run yet (no on-commit execution): the operation waits in the outbox.
    operation = services.request_force_unlock(actor=engineer, target=target, reason="stuck")
    assert operation.status == OperationStatus.QUEUED

    # Meanwhile the lock is released by its owner and taken by a new, healthy deploy.
    pg_target.execute("DELETE FROM migration_lock")
    pg_target.take_runbook_lock(locked_by="new-deploy")

    operation = services.execute_operation(operation.pk, worker="w1")
    assert operation.status == OperationStatus.FAILED
    assert "changed since the release was requested" in operation.error
    assert pg_target.runbook_lock_rows() == [(1, "new-deploy")]
    assert AuditEvent.objects.filter(operation=operation, action="operation.failed").exists()


def test_lock_released_by_someone_else_before_execution_fails_cleanly(pg_target, engineer):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target)
    operation = services.request_force_unlock(actor=engineer, target=target, reason="stuck")
    pg_target.execute("DELETE FROM migration_lock")

    operation = services.execute_operation(operation.pk)
    assert operation.status == OperationStatus.FAILED
    assert "not held" in operation.error


def test_a_redelivered_task_does_nothing_the_second_time(pg_target, engineer):
    pg_target.create_runbook_books(lock_age=STALE, locked_by="first")
    target = TargetFactory(db=pg_target)
    operation = services.request_force_unlock(actor=engineer, target=target, reason="stuck")

    assert services.execute_operation(operation.pk).status == OperationStatus.SUCCEEDED
    # A fresh lock taken afterwards must survive a duplicate delivery of the same task.
    pg_target.take_runbook_lock(locked_by="next-deploy")
    assert services.execute_operation(operation.pk) is None
    assert pg_target.runbook_lock_rows() == [(1, "next-deploy")]
    assert AuditEvent.objects.filter(operation=operation, action="operation.succeeded").count() == 1


def test_one_operation_per_target_at_a_time(pg_target, engineer):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target)
    first = services.request_force_unlock(actor=engineer, target=target, reason="stuck")
    with pytest.raises(
        services.ServiceError, match=f"operation #{first.pk} .* already in progress"
    ):
        services.request_force_unlock(actor=engineer, target=target, reason="again")
    assert Operation.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_request_refused_by_an_operation_that_ended_meanwhile_says_so(
    pg_target, engineer, monkeypatch
):
    """The insert meets the operation in the way, which ends before the request looks for it:
    a clear refusal naming it, not a database error."""
    from migrations_ops import plain_rows

    pg_target.create_runbook_books(lock_age=STALE)
    # Waiting for a second person, the first operation stays in the way until it is decided.
    target = TargetFactory(db=pg_target, requires_approval=True)
    first = services.request_force_unlock(actor=engineer, target=target, reason="stuck")
    assert first.status == OperationStatus.AWAITING_APPROVAL
    insert = plain_rows.insert

    def insert_then_end_the_first(row, **kwargs):
        try:
            return insert(row, **kwargs)
        except IntegrityError:
            # A second person rejects the first request at this very moment.
            finisher = threading.Thread(target=end_operation, args=(first.pk,))
            finisher.start()
            finisher.join()
            raise

    monkeypatch.setattr(plain_rows, "insert", insert_then_end_the_first)
    with pytest.raises(services.OperationInProgress) as refused:
        services.request_force_unlock(actor=engineer, target=target, reason="again")

    assert str(refused.value) == (
        f"operation #{first.pk} (Force-release migration lock) was in progress on "
        f"{target.name} and has just ended (cancelled): look at what it did, then ask again"
    )
    assert refused.value.operation_id == first.pk
    assert Operation.objects.count() == 1


def end_operation(operation_id: int) -> None:
    Operation.objects.filter(pk=operation_id).update(
        status=OperationStatus.CANCELLED, finished_at=timezone.now()
    )
    console_connection.close()


@pytest.fixture
def unreachable_broker():
    with broker_down():
        yield


def test_broker_down_keeps_the_operation_queued(pg_target, engineer, unreachable_broker):
    """The outbox: the request is kept even when the task cannot be sent."""
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target)
    operation = services.request_force_unlock(actor=engineer, target=target, reason="stuck")
    services.send_operation(operation.pk)

    operation.refresh_from_db()
    assert operation.status == OperationStatus.QUEUED
    assert "could not reach the task broker" in operation.log
    assert len(pg_target.runbook_lock_rows()) == 1


def test_status_read_remembers_when_a_timeless_lock_was_first_seen(sqlite_target):
    sqlite_target.create_knex_books(locked=True)
    target = TargetFactory(db=sqlite_target, convention="knex")

    first = services.read_target_status(target).observation.first_seen_held_at
    second = services.read_target_status(target).observation.first_seen_held_at
    assert first is not None and first == second

    sqlite_target.execute("UPDATE knex_migrations_lock SET is_locked = 0")
    assert services.read_target_status(target).observation.first_seen_held_at is None
    sqlite_target.execute("UPDATE knex_migrations_lock SET is_locked = 1")
    assert services.read_target_status(target).observation.first_seen_held_at > first


def test_a_different_lock_restarts_the_clock_and_a_failed_read_forgets_the_lock(any_target):
    any_target.create_runbook_books(lock_age=dt.timedelta(minutes=1), locked_by="deploy-1")
    target = TargetFactory(db=any_target)

    first = services.read_target_status(target).observation
    again = services.read_target_status(target).observation
    assert (again.held, again.holder, again.rows) == (True, "deploy-1", first.rows)
    assert again.first_seen_held_at == first.first_seen_held_at
    assert again.observed_at > first.observed_at

    any_target.execute("UPDATE migration_lock SET locked_by = 'deploy-2'")
    other = services.read_target_status(target).observation
    assert other.holder == "deploy-2"
    assert other.first_seen_held_at > first.first_seen_held_at

    any_target.execute("DROP TABLE migration_lock")
    failed = services.read_target_status(target)
    assert "no migration_lock table" in failed.error
    assert (failed.observation.held, failed.observation.first_seen_held_at) == (None, None)
    assert failed.observation.error == failed.error
    # What it returns is what it remembers; the lock last seen stays on record.
    stored = LockObservation.objects.get(target=target)
    assert (stored.held, stored.error, stored.holder) == (None, failed.error, "deploy-2")
    assert stored.rows == other.rows


def test_a_free_lock_is_remembered_as_read(any_target):
    any_target.create_runbook_books(lock_age=dt.timedelta(minutes=1))
    target = TargetFactory(db=any_target)
    services.read_target_status(target)
    any_target.execute("DELETE FROM migration_lock")

    observation = services.read_target_status(target).observation

    stored = LockObservation.objects.get(target=target)
    for seen in (observation, stored):
        assert (seen.held, seen.rows, seen.holder, seen.locked_at) == (False, [], "", None)
        assert (seen.first_seen_held_at, seen.error) == (None, "")
    assert observation.observed_at == stored.observed_at


def test_reading_every_target_writes_their_free_locks_in_one_update(pg_target, sqlite_target):
    pg_target.create_runbook_books()
    sqlite_target.create_knex_books(locked=True)
    free = [TargetFactory(db=pg_target, name=f"orders-{n}") for n in range(5)]
    held = TargetFactory(db=sqlite_target, name="billing", convention="knex")
    assert services.observe_targets() == 6  # first readings: each row written on its own
    first_seen = LockObservation.objects.get(target=held).first_seen_held_at
    before = dict(LockObservation.objects.values_list("target_id", "observed_at"))

    with CaptureQueriesContext(console_connection) as queries:
        assert services.observe_targets() == 6
    updates = [q["sql"] for q in queries if q["sql"].startswith('UPDATE "migrations_ops_lock')]
    assert len(updates) == 2  # the five free locks at once, the held one on its own

    for target in free:
        seen = LockObservation.objects.get(target=target)
        assert (seen.held, seen.rows, seen.holder, seen.error) == (False, [], "", "")
        assert seen.observed_at > before[target.pk]
    stored = LockObservation.objects.get(target=held)
    assert (stored.held, stored.first_seen_held_at) == (True, first_seen)
    assert stored.observed_at > before[held.pk]


def test_register_target_validates_and_records(engineer):
    admin = Actor.for_user(UserFactory(is_superuser=True), Door.CLI)
    target = services.register_target(
        actor=admin,
        name="orders",
        url="postgresql://app:pw-marker@db:5432/orders",
        convention="knex",
        environment="production",
    )
    event = AuditEvent.objects.get(action="target.registered", target=target)
    assert event.details["connection_url"] == "postgresql://app:***@db:5432/orders"
    assert "pw-marker" not in str(event.details)

    with pytest.raises(services.ServiceError, match="unsupported target URL scheme mysql"):
        services.register_target(
            actor=admin, name="bad", url="mysql://x", convention="knex", environment="staging"
        )
    with pytest.raises(services.ServiceError, match="already exists"):
        services.register_target(
            actor=admin,
            name="orders",
            url="sqlite:////tmp/x.db",
            convention="knex",
            environment="staging",
        )
    with pytest.raises(services.PermissionDenied):
        services.register_target(
            actor=engineer,
            name="other",
            url="sqlite:////tmp/x.db",
            convention="knex",
            environment="staging",
        )
