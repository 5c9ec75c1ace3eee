"""Every write the console makes: to its own books and, through the engine, to targets.

Admin, CLI, API and tasks are thin doors onto these functions, so a rule enforced here holds
for all of them. Errors meant for the user are ``ServiceError`` with a one-line message.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from functools import partial

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from migrations_ops import engine
from migrations_ops.actors import Actor
from migrations_ops.models import (
    ACTIVE_STATUSES,
    AuditEvent,
    LockObservation,
    LockState,
    Operation,
    OperationKind,
    OperationStatus,
    Target,
)

logger = logging.getLogger(__name__)

FORCE_UNLOCK_PERMISSION = "migrations_ops.force_unlock_target"


class ServiceError(Exception):
    """A refusal or failure to show the user as it is: one line, no secrets."""


class InvalidRequest(ServiceError):
    """The request itself is incomplete or wrong (a missing reason, a mistyped name)."""


class PermissionDenied(ServiceError):
    pass


class TargetNotFound(ServiceError):
    pass


class TargetUnavailable(ServiceError):
    """The target could not be read (unreachable, or not a migrations database)."""


@dataclass
class TargetStatus:
    """What a live read of a target found; ``error`` is set when it could not be read."""

    target: Target
    observation: LockObservation
    applied: list[engine.AppliedMigration] | None
    error: str | None


def require_permission(actor: Actor, permission: str, action: str) -> None:
    if not actor.has_perm(permission):
        raise PermissionDenied(f"{actor.name} is not allowed to {action}")


def record_audit_event(
    actor: Actor,
    action: str,
    *,
    target: Target | None = None,
    operation: Operation | None = None,
    details: dict | None = None,
) -> AuditEvent:
    return AuditEvent.objects.create(
        actor=actor.user,
        actor_name=actor.name,
        door=actor.door,
        action=action,
        target=target,
        target_name=target.name if target else "",
        operation=operation,
        details=details or {},
    )


def get_target(name: str) -> Target:
    try:
        return Target.objects.get(name=name)
    except Target.DoesNotExist:
        raise TargetNotFound(f"unknown target {name!r}") from None


# --- targets ---------------------------------------------------------------------------------
def register_target(
    *,
    actor: Actor,
    name: str,
    url: str,
    convention: str,
    environment: str,
    schema: str = "",
    lock_timeout_seconds: int = 60,
) -> Target:
    target = Target(
        name=name,
        connection_url=url,
        convention=convention,
        environment=environment,
        schema=schema,
        lock_timeout_seconds=lock_timeout_seconds,
    )
    try:
        target.full_clean()
    except ValidationError as error:
        raise ServiceError(_validation_message(error)) from None
    return save_target(actor=actor, target=target, changed_fields=TARGET_FIELDS)


TARGET_FIELDS = [
    "name",
    "environment",
    "convention",
    "connection_url",
    "schema",
    "lock_timeout_seconds",
]


def save_target(*, actor: Actor, target: Target, changed_fields: list[str]) -> Target:
    """Create or change a target (already validated) and record what changed, URL masked."""
    creating = target.pk is None
    permission = "migrations_ops.add_target" if creating else "migrations_ops.change_target"
    require_permission(actor, permission, "add targets" if creating else "change targets")
    details = {
        field: (target.masked_url if field == "connection_url" else getattr(target, field))
        for field in changed_fields
        if field in TARGET_FIELDS
    }
    with transaction.atomic():
        target.save()
        record_audit_event(
            actor,
            "target.registered" if creating else "target.changed",
            target=target,
            details=details,
        )
    return target


def _validation_message(error: ValidationError) -> str:
    if hasattr(error, "error_dict"):
        return "; ".join(
            f"{field}: {' '.join(messages)}" for field, messages in error.message_dict.items()
        )
    return " ".join(error.messages)


# --- reading a target (a write to the console: every read updates the lock observation) --------
def open_target(target: Target):
    return engine.connect(
        target.connection_url,
        schema=target.schema or None,
        connect_timeout=settings.TARGET_CONNECT_TIMEOUT,
        statement_timeout=settings.TARGET_STATEMENT_TIMEOUT,
    )


def read_target_status(target: Target, *, include_applied: bool = True) -> TargetStatus:
    """Read the lock (and applied migrations) live from the target and remember the lock."""
    convention = engine.get_convention(target.convention)
    try:
        with open_target(target) as connection:
            lock = convention.read_lock(connection)
            applied = convention.read_applied(connection) if include_applied else None
    except engine.EngineError as error:
        observation = observe_lock(target, None, error=str(error))
        return TargetStatus(target, observation, None, str(error))
    observation = observe_lock(target, lock)
    return TargetStatus(target, observation, applied, None)


def observe_lock(
    target: Target, lock: engine.LockState | None, *, error: str = ""
) -> LockObservation:
    """Remember what a read found. ``first_seen_held_at`` survives only while the same lock is
    seen again and again; after a failed read or a different lock row the clock restarts, so a
    lock is never thought older than it can be shown to be."""
    now = timezone.now()
    with transaction.atomic():
        observation, _ = LockObservation.objects.select_for_update().get_or_create(target=target)
        if lock is None:
            observation.held = None
            observation.first_seen_held_at = None
            observation.error = error
        else:
            same_lock = observation.held and observation.rows == lock.rows
            observation.held = lock.held
            observation.rows = lock.rows
            observation.holder = lock.holder or ""
            observation.locked_at = lock.locked_at
            observation.error = ""
            if not lock.held:
                observation.first_seen_held_at = None
            elif not same_lock or observation.first_seen_held_at is None:
                observation.first_seen_held_at = now
        observation.observed_at = now
        observation.save()
    observation.target = target
    return observation


# --- operations --------------------------------------------------------------------------------
def request_force_unlock(
    *,
    actor: Actor,
    target: Target,
    reason: str,
    release_fresh: bool = False,
    confirm_name: str | None = None,
) -> Operation:
    """Ask for the target's migration lock to be released; the work runs as a Celery task.

    The lock is read live first: a lock that is not held, or younger than the lock timeout
    (unless ``release_fresh``), is refused here, and the lock as seen now is what the task
    will release; if it changes in between, the task leaves it alone.
    """
    require_permission(actor, FORCE_UNLOCK_PERMISSION, "force-release migration locks")
    reason = (reason or "").strip()
    if not reason:
        raise InvalidRequest("a reason is required to force-release a migration lock")
    if target.is_production and (confirm_name or "").strip() != target.name:
        raise InvalidRequest(
            f"{target.name} is a production target: type its name to confirm the release"
        )
    status = read_target_status(target, include_applied=False)
    if status.error:
        raise TargetUnavailable(f"{target.name}: {status.error}")
    observation = status.observation
    now = timezone.now()
    state = observation.state(now, target.lock_timeout)
    if state == LockState.FREE:
        raise ServiceError(f"the migration lock of {target.name} is not held: nothing to release")
    if state != LockState.STALE and not release_fresh:
        raise ServiceError(fresh_lock_refusal(target, observation, now))
    return _create_operation(
        actor=actor,
        target=target,
        kind=OperationKind.FORCE_UNLOCK,
        reason=reason,
        params={
            "release_fresh": release_fresh,
            "expected_rows": observation.rows,
            "lock_state": state,
        },
    )


def fresh_lock_refusal(target: Target, observation: LockObservation, now: dt.datetime) -> str:
    age = int(observation.age(now).total_seconds())
    how_old = (
        f"held for {age} s"
        if observation.since_source == "target"
        else f"first seen held {age} s ago; its table keeps no time, so its real age is unknown"
    )
    return (
        f"the migration lock of {target.name} is not stale ({how_old}; lock timeout "
        f"{target.lock_timeout_seconds} s): tick 'release a fresh lock' (CLI: --force) "
        "to release it anyway"
    )


def _create_operation(
    *, actor: Actor, target: Target, kind: str, reason: str, params: dict
) -> Operation:
    operation = Operation(
        kind=kind,
        target=target,
        status=OperationStatus.QUEUED,
        requested_by=actor.user,
        requested_by_name=actor.name,
        door=actor.door,
        reason=reason,
        params=params,
        log=_log_line(f"requested by {actor.name} via {actor.door}: {reason}"),
    )
    try:
        with transaction.atomic():
            operation.save()
            record_audit_event(
                actor,
                "operation.requested",
                target=target,
                operation=operation,
                details={"kind": kind, "reason": reason, "params": params},
            )
            transaction.on_commit(partial(send_operation, operation.pk))
    except IntegrityError:
        active = Operation.objects.filter(target=target, status__in=ACTIVE_STATUSES).first()
        if active is None:
            raise
        raise ServiceError(
            f"operation #{active.pk} ({active.get_kind_display()}, {active.status}) is already "
            f"in progress on {target.name}: wait for it to finish"
        ) from None
    return operation


def send_operation(operation_id: int) -> None:
    """Hand the operation to Celery. If the broker is down the row stays queued: the outbox
    keeps the request, so a broker outage delays work and never loses it."""
    from migrations_ops.tasks import execute_operation_task

    try:
        execute_operation_task.delay(operation_id)
    except Exception as error:  # the broker's client raises many kinds
        logger.warning("operation %s stays queued: broker unavailable: %s", operation_id, error)
        _append_log(operation_id, f"could not reach the task broker ({error}); still queued")


def execute_operation(operation_id: int, *, worker: str = "") -> Operation | None:
    """Run a queued operation. The claim is a conditional update, so a duplicated or
    redelivered task finds the operation already claimed and does nothing."""
    now = timezone.now()
    claimed = Operation.objects.filter(pk=operation_id, status=OperationStatus.QUEUED).update(
        status=OperationStatus.RUNNING, started_at=now, heartbeat_at=now, worker=worker
    )
    if not claimed:
        logger.info("operation %s was not queued any more; nothing to do", operation_id)
        return None
    operation = Operation.objects.select_related("target").get(pk=operation_id)
    log = [_log_line(f"claimed by {worker or 'in-process'}")]
    try:
        result = RUNNERS[operation.kind](operation, log)
    except engine.EngineError as error:
        return _finish(operation, log, OperationStatus.FAILED, error=str(error))
    except Exception as error:
        logger.exception("operation %s failed unexpectedly", operation_id)
        return _finish(
            operation, log, OperationStatus.FAILED, error=f"internal error: {type(error).__name__}"
        )
    return _finish(operation, log, OperationStatus.SUCCEEDED, result=result)


def _run_force_unlock(operation: Operation, log: list[str]) -> dict:
    target = operation.target
    convention = engine.get_convention(target.convention)
    with open_target(target) as connection:
        log.append(_log_line(f"connected to {target.name} ({target.dialect})"))
        before, after = convention.release_lock(
            connection, expected_rows=operation.params.get("expected_rows")
        )
    log.append(
        _log_line(f"released the lock; it was: {engine.conventions.describe_rows(before.rows)}")
    )
    observe_lock(target, after)
    return {"before": before.as_dict(), "after": after.as_dict()}


RUNNERS = {OperationKind.FORCE_UNLOCK: _run_force_unlock}


def _finish(
    operation: Operation,
    log: list[str],
    status: str,
    *,
    result: dict | None = None,
    error: str = "",
) -> Operation:
    finished_at = timezone.now()
    log.append(_log_line(f"{status}{': ' + error if error else ''}"))
    with transaction.atomic():
        operation = Operation.objects.select_for_update().get(pk=operation.pk)
        operation.status = status
        operation.finished_at = finished_at
        operation.result = result or {}
        operation.error = error
        operation.log += "".join(log)
        operation.save(update_fields=["status", "finished_at", "result", "error", "log"])
        record_audit_event(
            Actor.worker(operation.worker),
            f"operation.{status}",
            target=operation.target,
            operation=operation,
            details={"kind": operation.kind, "error": error, "result": result or {}},
        )
    return operation


def _log_line(text: str) -> str:
    return f"{timezone.now():%Y-%m-%d %H:%M:%S.%f}"[:-3] + f"Z {text}\n"


def _append_log(operation_id: int, text: str) -> None:
    with transaction.atomic():
        operation = Operation.objects.select_for_update().get(pk=operation_id)
        operation.log += _log_line(text)
        operation.save(update_fields=["log"])
