"""Every write the console makes: to its own books and, through the engine, to targets.

Admin, CLI, API and tasks are thin doors onto these functions, so a rule enforced here holds
for all of them. Errors meant for the user are ``ServiceError`` with a one-line message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import threading
from dataclasses import dataclass, field
from functools import partial

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db import connection as console_connection
from django.db.models import Case, DateTimeField, F, Max, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from incidents.models import Incident, IncidentStatus
from migrations_ops import engine
from migrations_ops.actors import Actor
from migrations_ops.models import (
    ACTIVE_STATUSES,
    TARGET_SETTINGS,
    AlertThresholds,
    ApiToken,
    AuditEvent,
    Environment,
    LockObservation,
    LockState,
    MigrationScript,
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


class OperationInProgress(ServiceError):
    """One mutating operation per target at a time: ``operation_id`` is the one in the way."""

    def __init__(self, message: str, *, operation_id: int):
        super().__init__(message)
        self.operation_id = operation_id


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


class InvalidToken(ServiceError):
    pass


# How often a token's ``last_used_at`` is written: often enough to tell an unused token, rarely
# enough that a busy application's polling costs no write per request.
TOKEN_USE_RESOLUTION = dt.timedelta(minutes=1)


def hash_api_token(raw: str) -> str:
    # The token is 32 random bytes: a fast hash suffices (nothing to guess by brute force).
    return hashlib.sha256(raw.encode()).hexdigest()


def authenticate_api_token(raw: str) -> ApiToken:
    """The active token ``raw`` is, with its targets' ids in ``target_ids``; InvalidToken if
    none (unknown or revoked)."""
    token = (
        ApiToken.objects.filter(token_hash=hash_api_token(raw), revoked_at__isnull=True)
        .only("id", "name", "prefix", "last_used_at")
        .first()
    )
    if token is None:
        raise InvalidToken("the API token is unknown or revoked")
    token.target_ids = frozenset(token.targets.values_list("id", flat=True))
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > TOKEN_USE_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token


def get_target(name: str) -> Target:
    try:
        return Target.objects.get(name=name)
    except Target.DoesNotExist:
        raise TargetNotFound(f"unknown target {name!r}") from None


class OperationNotFound(ServiceError):
    pass


def get_operation(operation_id: int) -> Operation:
    try:
        return Operation.objects.select_related("target").get(pk=operation_id)
    except Operation.DoesNotExist:
        raise OperationNotFound(f"no operation #{operation_id}") from None


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
    requires_approval: bool | None = None,
    health_url: str = "",
) -> Target:
    """Register a target; production targets start under the two-person rule."""
    target = Target(
        name=name,
        connection_url=url,
        convention=convention,
        environment=environment,
        schema=schema,
        lock_timeout_seconds=lock_timeout_seconds,
        health_url=health_url,
        requires_approval=(
            environment == Environment.PRODUCTION
            if requires_approval is None
            else requires_approval
        ),
    )
    try:
        target.full_clean()
    except ValidationError as error:
        raise ServiceError(_validation_message(error)) from None
    return save_target(actor=actor, target=target, changed_fields=TARGET_SETTINGS)


def save_target(*, actor: Actor, target: Target, changed_fields: list[str]) -> Target:
    """Create or change a target (already validated) and record what changed, URL masked."""
    creating = target.pk is None
    permission = "migrations_ops.add_target" if creating else "migrations_ops.change_target"
    require_permission(actor, permission, "add targets" if creating else "change targets")
    details = {
        field: (target.masked_url if field == "connection_url" else getattr(target, field))
        for field in changed_fields
        if field in TARGET_SETTINGS
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


def save_alert_thresholds(
    *, actor: Actor, thresholds: AlertThresholds, changed: list[str]
) -> AlertThresholds:
    """The fleet view's thresholds: one row (id 1), every change on the audit trail."""
    require_permission(
        actor, "migrations_ops.change_alertthresholds", "change the alert thresholds"
    )
    thresholds.pk = 1
    with transaction.atomic():
        thresholds.save()
        record_audit_event(
            actor,
            "thresholds.changed",
            details={field: getattr(thresholds, field) for field in changed},
        )
    return thresholds


# --- reading a target (a write to the console: every read updates the lock observation) --------
# Target connections kept open between uses in this process: a new PostgreSQL connection
# costs a few milliseconds, several times the work done on it.
_kept_target_connections = engine.connection.ConnectionCache()


def open_target(target: Target):
    """A connection to the target: a kept one (see TARGET_KEEP_CONNECTIONS), whose session is
    reset before it is lent, so a migration's SQL may run on it too; or else a new one."""
    kept = settings.TARGET_KEEP_CONNECTIONS
    return (_kept_target_connections.connect if kept else engine.connect)(
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
            # read_lock has checked the tables
            applied = (
                convention.read_applied(connection, check_tables=False) if include_applied else None
            )
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
    written = _record_observation(target, lock, error=error)
    if written is None:
        observation = LockObservation.objects.get(target=target)
    else:
        observation = LockObservation(**written)
    observation.target = target
    return observation


def _record_observation(
    target: Target, lock: engine.LockState | None, *, error: str = ""
) -> dict | None:
    """``observe_lock`` in one UPDATE that compares with the row as it is, so readers of the
    same target at once apply their reads in turn, with no transaction of its own (it joins
    the caller's). Returns the row's fields when the read alone decides them all (a free
    lock), else None: what a held lock's clock or a failed read keeps is in the row."""
    now = timezone.now()
    if lock is None:
        changes = {"held": None, "first_seen_held_at": None, "error": error}
        first_seen = None
    else:
        first_seen = now if lock.held else None
        changes = {
            "held": lock.held,
            "rows": lock.rows,
            "holder": lock.holder or "",
            "locked_at": lock.locked_at,
            "error": "",
            "first_seen_held_at": first_seen,
        }
    changes["observed_at"] = now
    update = changes
    if first_seen is not None:
        update = changes | {
            "first_seen_held_at": Case(
                When(
                    held=True,
                    rows=lock.rows,
                    first_seen_held_at__isnull=False,
                    then=F("first_seen_held_at"),
                ),
                default=Value(now, output_field=DateTimeField()),
            )
        }
    observations = LockObservation.objects.filter(target=target)
    if not observations.update(**update):
        try:
            with transaction.atomic():  # the target's first read
                LockObservation.objects.create(target=target, **changes)
        except IntegrityError:  # another reader's first read came first
            observations.update(**update)
    return {"target": target, **changes} if lock is not None and not lock.held else None


# --- operations --------------------------------------------------------------------------------
def request_force_unlock(
    *,
    actor: Actor,
    target: Target,
    reason: str,
    release_fresh: bool = False,
    confirm_name: str | None = None,
    incident: Incident | None = None,
) -> Operation:
    """Ask for the target's migration lock to be released; the work runs as a Celery task.

    The lock is read live first: a lock that is not held, or younger than the lock timeout
    (unless ``release_fresh``), is refused here, and the lock as seen now is what the task
    will release; if it changes in between, the task leaves it alone.
    """
    require_permission(actor, FORCE_UNLOCK_PERMISSION, "force-release migration locks")
    reason = _require_reason(reason, "force-release a migration lock")
    _require_confirmation(target, confirm_name, "confirm the release")
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
        incident=incident,
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


APPROVE_PERMISSION = "migrations_ops.approve_operation"


def needs_approval(actor: Actor, target: Target, kind: str, params: dict) -> bool:
    """The two-person rule: a change to a target that requires approval waits for a second
    person, and so does any change to production asked for by someone who may not approve."""
    if kind == OperationKind.VERIFY or params.get("dry_run"):
        return False
    return target.requires_approval or (
        target.is_production and not actor.has_perm(APPROVE_PERMISSION)
    )


def _create_operation(
    *,
    actor: Actor,
    target: Target,
    kind: str,
    reason: str,
    params: dict,
    incident: Incident | None = None,
) -> Operation:
    """Write the operation and its audit event; ``incident``: the one it serves, if any."""
    awaiting = needs_approval(actor, target, kind, params)
    operation = Operation(
        kind=kind,
        target=target,
        status=OperationStatus.AWAITING_APPROVAL if awaiting else OperationStatus.QUEUED,
        requested_by=actor.user,
        requested_by_name=actor.name,
        door=actor.door,
        reason=reason,
        params=params,
        incident=incident,
        log=_log_line(f"requested by {actor.name} via {actor.door}: {reason}"),
    )
    try:
        with transaction.atomic():
            _refuse_closed_incident(incident)
            operation.save()
            record_audit_event(
                actor,
                "operation.requested",
                target=target,
                operation=operation,
                details={
                    "kind": kind,
                    "reason": reason,
                    "params": params,
                    "awaiting_approval": awaiting,
                    "incident": incident.pk if incident else None,
                },
            )
            _note_on_incidents(operation)
            if not awaiting:
                transaction.on_commit(partial(send_operation, operation.pk))
    except IntegrityError:
        active = (
            Operation.objects.filter(target=target, status__in=ACTIVE_STATUSES)
            .exclude(kind=OperationKind.VERIFY)
            .first()
        )
        if active is None:
            raise
        raise OperationInProgress(
            f"operation #{active.pk} ({active.get_kind_display()}, {active.status}) is already "
            f"in progress on {target.name}: wait for it to finish",
            operation_id=active.pk,
        ) from None
    return operation


def _refuse_closed_incident(incident: Incident | None) -> None:
    """An operation may serve any incident not yet closed. Its row is locked until the
    operation is written, so the incident cannot close in between."""
    if incident is None:
        return
    status = (
        Incident.objects.select_for_update()
        .filter(pk=incident.pk)
        .values_list("status", flat=True)
        .first()
    )
    if status is None:
        raise InvalidRequest(f"unknown incident #{incident.pk}")
    if status == IncidentStatus.CLOSED:
        raise InvalidRequest(
            f"incident #{incident.pk} is closed: operations can no longer be linked to it"
        )


# --- the two-person rule ---------------------------------------------------------------------
def approve_operation(*, actor: Actor, operation: Operation, reason: str = "") -> Operation:
    """A second person lets an operation awaiting approval run."""
    require_permission(actor, APPROVE_PERMISSION, "approve operations")
    _refuse_own_request(actor, operation, "approve")
    _refuse_expired(operation)
    now = timezone.now()
    return _decide(
        actor,
        operation,
        "approved",
        reason,
        status=OperationStatus.QUEUED,
        approved_by=actor.user,
        approved_by_name=actor.name,
        decided_at=now,
        decision_reason=(reason or "").strip(),
    )


def reject_operation(*, actor: Actor, operation: Operation, reason: str) -> Operation:
    require_permission(actor, APPROVE_PERMISSION, "reject operations")
    reason = _require_reason(reason, "reject an operation")
    now = timezone.now()
    return _decide(
        actor,
        operation,
        "rejected",
        reason,
        status=OperationStatus.CANCELLED,
        finished_at=now,
        decided_at=now,
        decision_reason=reason,
        error=f"rejected by {actor.name}: {reason}",
    )


def _decide(actor: Actor, operation: Operation, verb: str, reason: str, **changes) -> Operation:
    """Apply a decision to an operation still awaiting approval (a conditional update, so two
    deciders cannot both win); an approval sends it to the worker."""
    with transaction.atomic():
        decided = Operation.objects.filter(
            pk=operation.pk, status=OperationStatus.AWAITING_APPROVAL
        ).update(**changes)
        if not decided:
            raise _not_awaiting(operation)
        _append_log(operation.pk, f"{verb} by {actor.name} via {actor.door}: {reason}")
        record_audit_event(
            actor,
            f"operation.{verb}",
            target=operation.target,
            operation=operation,
            details={"requested_by": operation.requested_by_name, "reason": reason},
        )
        if changes["status"] == OperationStatus.QUEUED:
            transaction.on_commit(partial(send_operation, operation.pk))
    operation.refresh_from_db()
    return operation


def expire_approval_requests(now: dt.datetime | None = None) -> list[int]:
    """Requests nobody approved within OPERATION_APPROVAL_TTL are cancelled: an approval given
    hours later would act on a target that has moved on."""
    now = now or timezone.now()
    deadline = now - dt.timedelta(seconds=settings.OPERATION_APPROVAL_TTL)
    expired = []
    stale = Operation.objects.filter(
        status=OperationStatus.AWAITING_APPROVAL, requested_at__lt=deadline
    ).select_related("target")
    for operation in stale:
        with transaction.atomic():
            if not Operation.objects.filter(
                pk=operation.pk, status=OperationStatus.AWAITING_APPROVAL
            ).update(
                status=OperationStatus.CANCELLED,
                finished_at=now,
                decided_at=now,
                error=f"not approved within {settings.OPERATION_APPROVAL_TTL} s: expired",
            ):
                continue
            record_audit_event(
                Actor.worker("sweeper"),
                "operation.expired",
                target=operation.target,
                operation=operation,
                details={"requested_at": operation.requested_at.isoformat()},
            )
        expired.append(operation.pk)
    return expired


def _refuse_own_request(actor: Actor, operation: Operation, verb: str) -> None:
    same_user = actor.user is not None and actor.user.pk == operation.requested_by_id
    if same_user or actor.name == operation.requested_by_name:
        raise PermissionDenied(
            f"{actor.name} asked for operation #{operation.pk}: a different person must {verb} it"
        )


def _refuse_expired(operation: Operation) -> None:
    age = (timezone.now() - operation.requested_at).total_seconds()
    if (
        operation.status == OperationStatus.AWAITING_APPROVAL
        and age > settings.OPERATION_APPROVAL_TTL
    ):
        expire_approval_requests()
        raise ServiceError(
            f"operation #{operation.pk} waited {int(age)} s, longer than the approval window "
            f"({settings.OPERATION_APPROVAL_TTL} s): it has expired; request it again"
        )


def _not_awaiting(operation: Operation) -> ServiceError:
    operation.refresh_from_db()
    return ServiceError(
        f"operation #{operation.pk} is {operation.get_status_display().lower()}, not awaiting "
        "approval"
    )


def send_operation(operation_id: int) -> bool:
    """Hand the operation to Celery. If the broker is down the row stays queued: the outbox
    keeps the request, so a broker outage delays work and never loses it (the sweeper sends it
    again, see ``sweep_operations``). Returns whether the task was sent."""
    from migrations_ops.tasks import execute_operation_task

    try:
        execute_operation_task.delay(operation_id)
    except Exception as error:  # the broker's client raises many kinds
        logger.warning("operation %s stays queued: broker unavailable: %s", operation_id, error)
        _append_log(operation_id, f"could not reach the task broker ({error}); still queued")
        operation = Operation.objects.select_related("target").get(pk=operation_id)
        record_audit_event(
            Actor.worker("outbox"),
            "operation.send_failed",
            target=operation.target,
            operation=operation,
            details={"error": str(error)},
        )
        return False
    return True


def execute_operation(operation_id: int, *, worker: str = "") -> Operation | None:
    """Run a queued operation. The claim is a conditional update, so a duplicated or
    redelivered task finds the operation already claimed and does nothing. While the runner
    works, a heartbeat keeps ``heartbeat_at`` fresh for the sweeper."""
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
        with _heartbeat(operation_id, operation.log, log):
            result = RUNNERS[operation.kind](operation, log)
    except SoftTimeLimitExceeded:
        return _finish(operation, log, OperationStatus.FAILED, error=_time_limit_error(operation))
    except engine.EngineError as error:
        # A failed migration still reports the statements that ran before the failure.
        report = getattr(error, "report", None)
        result = report.as_dict() if report is not None else None
        return _finish(operation, log, OperationStatus.FAILED, error=str(error), result=result)
    except Exception as error:
        logger.exception("operation %s failed unexpectedly", operation_id)
        return _finish(
            operation, log, OperationStatus.FAILED, error=f"internal error: {type(error).__name__}"
        )
    return _finish(operation, log, OperationStatus.SUCCEEDED, result=result)


@contextlib.contextmanager
def _heartbeat(operation_id: int, claimed_log: str, log: list[str]):
    """While the body runs, refresh the operation's ``heartbeat_at`` every
    OPERATION_HEARTBEAT_SECONDS from a thread of its own, with its own connection to the
    console's database (closed when it stops): a worker that dies stops beating, which is how
    the sweeper tells it from one still at work. Each beat also writes the log so far, so the
    operation's page shows it grow."""
    stop = threading.Event()
    thread = threading.Thread(
        target=_beat,
        args=(operation_id, stop, settings.OPERATION_HEARTBEAT_SECONDS, claimed_log, log),
        name=f"heartbeat-operation-{operation_id}",
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _beat(
    operation_id: int, stop: threading.Event, interval: float, claimed_log: str, log: list[str]
) -> None:
    try:
        while not stop.wait(interval):
            try:
                with transaction.atomic():
                    # Never waits for the row: one locked by a writer (the operation finishing,
                    # the sweeper) skips this beat, so stopping the heartbeat cannot deadlock.
                    status = (
                        Operation.objects.select_for_update(skip_locked=True)
                        .filter(pk=operation_id)
                        .values_list("status", flat=True)
                        .first()
                    )
                    if status == OperationStatus.RUNNING:
                        Operation.objects.filter(pk=operation_id).update(
                            heartbeat_at=timezone.now(), log=claimed_log + "".join(list(log))
                        )
            except Exception as error:  # the console's database away for a moment: next beat
                logger.warning("operation %s: heartbeat not recorded: %s", operation_id, error)
                console_connection.close()
                continue
            if status is not None and status != OperationStatus.RUNNING:
                return  # finished, or marked lost: nothing left to keep alive
    finally:
        console_connection.close()


def _time_limit_error(operation: Operation) -> str:
    """The soft time limit stopped the runner (Celery raised it in the task): what that left."""
    error = (
        f"stopped by the time limit: still running after {settings.OPERATION_SOFT_TIME_LIMIT} s "
        "(OPERATION_SOFT_TIME_LIMIT); its connection to the target was closed, so the target "
        "rolls its open transaction back (statements run outside a transaction stay done)"
    )
    if operation.kind in LOCK_TAKING_KINDS:
        state, note = _lock_left_by(operation)
        if state in ("ours", "maybe_ours", "unknown"):
            error += f"; {note}"
    return error


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
    claimed_log = operation.log  # as claimed: the heartbeat may have written part of ``log``
    with transaction.atomic():
        operation.status = status
        operation.finished_at = finished_at
        operation.result = result or {}
        operation.error = error
        operation.log = claimed_log + "".join(log)
        # The operation as claimed, with its target, is all the rest needs: no read back. The
        # UPDATE locks the row until the commit, so the heartbeat skips its beats meanwhile.
        operation.save(update_fields=["status", "finished_at", "result", "error", "log"])
        record_audit_event(
            Actor.worker(operation.worker),
            f"operation.{status}",
            target=operation.target,
            operation=operation,
            details={"kind": operation.kind, "error": error, "result": result or {}},
        )
        _note_on_incidents(operation)
    return operation


def _note_on_incidents(operation: Operation) -> None:
    """Put the operation on the open incidents' timelines. A failure there is logged and
    never fails or undoes the operation (the savepoint keeps the rest of the transaction)."""
    try:
        # incidents builds on this module
        from incidents.selectors import incidents_to_note
        from incidents.services import record_operation

        incidents = incidents_to_note(operation)
        if not incidents:  # as most of the time: spare the savepoint
            return
        with transaction.atomic():
            record_operation(operation, incidents)
    except Exception:
        logger.exception("could not note operation #%s on incident timelines", operation.pk)


def _log_line(text: str) -> str:
    return f"{timezone.now():%Y-%m-%d %H:%M:%S.%f}"[:-3] + f"Z {text}\n"


def _append_log(operation_id: int, text: str) -> None:
    with transaction.atomic():
        operation = Operation.objects.select_for_update().get(pk=operation_id)
        operation.log += _log_line(text)
        operation.save(update_fields=["log"])


# --- the sweeper: the outbox's other half, and the dead-worker detector -------------------------
# The kinds that take the target's migration lock (engine.run_migrations), dry runs included.
LOCK_TAKING_KINDS = (OperationKind.APPLY, OperationKind.ROLLBACK)


@dataclass
class LostOperation:
    operation_id: int
    kind: str
    target: str
    worker: str
    last_heard_at: dt.datetime
    # "ours", "maybe_ours" (a lock table that names no holder), "other", "free", "unknown"
    # (unreadable), or "" for a kind that takes no lock.
    lock: str
    lock_note: str

    def as_dict(self) -> dict:
        return {
            "operation": self.operation_id,
            "kind": self.kind,
            "target": self.target,
            "worker": self.worker,
            "last_heard_at": self.last_heard_at.isoformat(),
            "lock": self.lock,
            "lock_note": self.lock_note,
        }


@dataclass
class SweepReport:
    """What one sweep did: operations sent again, those the broker still refused, and those
    whose worker fell silent, marked lost."""

    resent: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)
    lost: list[LostOperation] = field(default_factory=list)
    expired: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "resent": self.resent,
            "unsent": self.unsent,
            "lost": [lost.as_dict() for lost in self.lost],
            "expired": self.expired,
        }

    def lines(self) -> list[str]:
        lines = [f"operation #{pk}: still queued, sent again" for pk in self.resent]
        lines += [
            f"operation #{pk}: not approved within {settings.OPERATION_APPROVAL_TTL} s, expired"
            for pk in self.expired
        ]
        lines += [
            f"operation #{pk}: still queued, the task broker is unreachable" for pk in self.unsent
        ]
        for lost in self.lost:
            note = f"; {lost.lock_note}" if lost.lock_note else ""
            lines.append(
                f"operation #{lost.operation_id} ({lost.kind} on {lost.target}): marked lost, "
                f"no heartbeat from {lost.worker or 'its worker'} since "
                f"{lost.last_heard_at:%Y-%m-%d %H:%M:%S} UTC{note}"
            )
        return lines


def sweep_operations(now: dt.datetime | None = None, *, actor: Actor | None = None) -> SweepReport:
    """Run periodically (the ``migrations_ops.sweep_operations`` task, scheduled by ``make
    beat``) or by hand (``ops sweep``):

    - an operation queued longer than OUTBOX_RESEND_AFTER seconds (its task never sent, or lost
      by the broker) is sent again, at most once per that many seconds: a duplicate is harmless,
      the claim being a conditional update;
    - a running operation not heard from (heartbeat) for OPERATION_LOST_AFTER seconds is marked
      lost, if it is still running with that same heartbeat, and the target's lock is read: a
      lock it left held is reported, for a person to force-release. Nothing is re-run: what a
      dead worker did to the target is for a person to check;
    - a request awaiting approval longer than OPERATION_APPROVAL_TTL seconds expires.
    """
    now = now or timezone.now()
    actor = actor or Actor.sweeper()
    report = SweepReport()
    report.expired = expire_approval_requests(now)
    _resend_queued(now, actor, report)
    _mark_lost(now, actor, report)
    return report


def _resend_queued(now: dt.datetime, actor: Actor, report: SweepReport) -> None:
    deadline = now - dt.timedelta(seconds=settings.OUTBOX_RESEND_AFTER)
    waiting = (
        Operation.objects.filter(status=OperationStatus.QUEUED)
        .annotate(
            # queued when requested, or when approved
            queued_at=Coalesce("decided_at", "requested_at"),
            resent_at=Max(
                "audit_events__created_at", filter=Q(audit_events__action="operation.resent")
            ),
        )
        .filter(queued_at__lt=deadline)
        .filter(Q(resent_at__isnull=True) | Q(resent_at__lt=deadline))
        .select_related("target")
        .order_by("pk")
    )
    for operation in waiting:
        waited = int((now - operation.queued_at).total_seconds())
        _append_log(operation.pk, f"still queued after {waited} s: {actor.name} sends it again")
        if not send_operation(operation.pk):
            report.unsent.append(operation.pk)
            continue
        record_audit_event(
            actor,
            "operation.resent",
            target=operation.target,
            operation=operation,
            details={"queued_at": operation.queued_at.isoformat(), "waited_seconds": waited},
        )
        report.resent.append(operation.pk)


def _mark_lost(now: dt.datetime, actor: Actor, report: SweepReport) -> None:
    deadline = now - dt.timedelta(seconds=settings.OPERATION_LOST_AFTER)
    silent = (
        Operation.objects.filter(status=OperationStatus.RUNNING)
        .annotate(last_heard_at=Coalesce("heartbeat_at", "started_at", "requested_at"))
        .filter(last_heard_at__lt=deadline)
        .select_related("target")
        .order_by("pk")
    )
    for operation in silent:
        last_heard_at = operation.last_heard_at
        lock, lock_note = (
            _lock_left_by(operation) if operation.kind in LOCK_TAKING_KINDS else ("", "")
        )
        error = (
            f"lost: no heartbeat from {operation.worker or 'its worker'} since "
            f"{last_heard_at:%Y-%m-%d %H:%M:%S} UTC ({int((now - last_heard_at).total_seconds())} "
            f"s, more than OPERATION_LOST_AFTER = {settings.OPERATION_LOST_AFTER} s): the worker "
            "died or was cut off mid-run; what it had not committed on the target is rolled back "
            "there. Check the target before asking again"
        )
        with transaction.atomic():
            marked = Operation.objects.filter(
                pk=operation.pk,
                status=OperationStatus.RUNNING,
                heartbeat_at=operation.heartbeat_at,  # None: IS NULL
            ).update(status=OperationStatus.LOST, finished_at=now, error=error)
            if not marked:
                continue  # it beat, or finished, since it was read: alive after all
            _append_log(operation.pk, f"marked lost by {actor.name}: {error}")
            if lock_note:
                _append_log(operation.pk, lock_note)
            record_audit_event(
                actor,
                "operation.lost",
                target=operation.target,
                operation=operation,
                details={
                    "kind": operation.kind,
                    "worker": operation.worker,
                    "last_heard_at": last_heard_at.isoformat(),
                    "lock": lock,
                    "lock_note": lock_note,
                },
            )
        report.lost.append(
            LostOperation(
                operation_id=operation.pk,
                kind=operation.kind,
                target=operation.target.name,
                worker=operation.worker,
                last_heard_at=last_heard_at,
                lock=lock,
                lock_note=lock_note,
            )
        )


def _lock_left_by(operation: Operation) -> tuple[str, str]:
    """Whether the target's migration lock is still held by this operation, which will never
    release it now (its worker died, or the time limit stopped it)."""
    target = operation.target
    status = read_target_status(target, include_applied=False)
    if status.error:
        return "unknown", (
            f"could not read the migration lock of {target.name} ({status.error}): check "
            "whether this operation left it held"
        )
    observation = status.observation
    if not observation.held:
        return "free", f"the migration lock of {target.name} is free"
    holder = lock_holder(operation)
    release = (
        "force-release it (admin: Force-release migration lock, with 'release a fresh lock'; "
        f"CLI: ops unlock --target {target.name} --reason TEXT --force)"
    )
    if observation.holder == holder or any(
        value == holder for row in observation.rows for value in row.values()
    ):
        return "ours", (
            f"the migration lock of {target.name} is still held by this operation ({holder}) "
            f"and nothing will release it: {release}"
        )
    if not observation.holder:
        rows = engine.conventions.describe_rows(observation.rows)
        return "maybe_ours", (
            f"the migration lock of {target.name} is held and its table names no holder "
            f"({rows}): it may be this operation's; unless another migration is running, "
            f"{release}"
        )
    return "other", (
        f"the migration lock of {target.name} is held by {observation.holder}, not by this "
        "operation"
    )


# --- migration scripts -------------------------------------------------------------------------
@dataclass
class ImportReport:
    added: list[str]
    updated: list[str]
    unchanged: list[str]
    drift: list[str]
    removed: list[str]
    missing: list[str]

    def as_dict(self) -> dict:
        return {
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "drift": self.drift,
            "removed": self.removed,
            "missing": self.missing,
        }


def import_scripts(*, actor: Actor, target: Target, directory: str) -> ImportReport:
    """Store the migrations folder's scripts. A changed script whose migration is applied on
    the target (or whose state cannot be read) is not replaced: it is recorded as drift. A
    script gone from the folder (a reverted migration) is dropped if it is not applied, and
    kept, reported missing, if it is."""
    require_permission(actor, "migrations_ops.import_scripts", "import migration scripts")
    try:
        parsed = engine.parse_directory(directory)
    except engine.ScriptError as error:
        raise InvalidRequest(str(error)) from None
    applied = _applied_or_none(target)
    existing = {script.version: script for script in target.scripts.all()}
    report = ImportReport([], [], [], [], [], [])
    now = timezone.now()
    with transaction.atomic():
        for script in parsed:
            row = existing.pop(script.version, None)
            if row is None:
                _script_row(target, script).save()
                report.added.append(script.filename)
            elif row.checksum == script.checksum:
                if row.drift_checksum:
                    row.drift_checksum, row.drift_detected_at = "", None
                    row.save(update_fields=["drift_checksum", "drift_detected_at"])
                report.unchanged.append(script.filename)
            elif applied is None or engine.plan.applied_for(row, applied) is not None:
                if row.drift_checksum != script.checksum:
                    row.drift_checksum, row.drift_detected_at = script.checksum, now
                    row.save(update_fields=["drift_checksum", "drift_detected_at"])
                report.drift.append(script.filename)
            else:
                updated = _script_row(target, script)
                updated.pk = row.pk
                updated.save()
                report.updated.append(script.filename)
        for row in sorted(existing.values(), key=lambda row: row.filename):
            if applied is not None and engine.plan.applied_for(row, applied) is None:
                row.delete()
                report.removed.append(row.filename)
            else:
                report.missing.append(row.filename)
        record_audit_event(
            actor,
            "scripts.imported",
            target=target,
            details={"directory": str(directory), **report.as_dict()},
        )
    return report


def _applied_or_none(target: Target) -> list[engine.AppliedMigration] | None:
    status = read_target_status(target)
    return status.applied


def _script_row(target: Target, script: engine.MigrationScript) -> MigrationScript:
    return MigrationScript(
        target=target,
        version=script.version,
        name=script.name,
        filename=script.filename,
        layout=script.layout,
        up_sql=script.up_sql,
        down_sql=script.down_sql,
        up_statements=[{"sql": s.sql, "line": s.line} for s in script.up_statements],
        down_statements=[{"sql": s.sql, "line": s.line} for s in script.down_statements],
        transactional=script.transactional,
        needs_no_transaction=list(script.needs_no_transaction),
        checksum=script.checksum,
    )


def engine_scripts(target: Target, *, version: str | None = None) -> list[engine.MigrationScript]:
    """The target's stored scripts in the engine's own shape; only ``version``'s if given."""
    rows = target.scripts.order_by("version")
    if version is not None:
        rows = rows.filter(version=version)
    return [
        engine.MigrationScript(
            version=row.version,
            name=row.name,
            filename=row.filename,
            layout=row.layout,
            up_sql=row.up_sql,
            down_sql=row.down_sql,
            up_statements=tuple(engine.Statement(s["sql"], s["line"]) for s in row.up_statements),
            down_statements=tuple(
                engine.Statement(s["sql"], s["line"]) for s in row.down_statements
            ),
            transactional=row.transactional,
            needs_no_transaction=tuple(row.needs_no_transaction),
            checksum=row.checksum,
        )
        for row in rows
    ]


# --- migration operations ----------------------------------------------------------------------
def _require_reason(reason: str, what: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise InvalidRequest(f"a reason is required to {what}")
    return reason


def _require_confirmation(target: Target, confirm_name: str | None, what: str) -> None:
    if target.is_production and (confirm_name or "").strip() != target.name:
        raise InvalidRequest(f"{target.name} is a production target: type its name to {what}")


def _live_books(
    target: Target, *, refuse_stale_lock: bool = False
) -> list[engine.AppliedMigration]:
    status = read_target_status(target)
    if status.error:
        raise TargetUnavailable(f"{target.name}: {status.error}")
    observation = status.observation
    if (
        refuse_stale_lock
        and observation.state(timezone.now(), target.lock_timeout) == LockState.STALE
    ):
        holder = f" by {observation.holder}" if observation.holder else ""
        raise ServiceError(
            f"the migration lock of {target.name} is stale (held{holder} longer than its "
            f"{target.lock_timeout_seconds} s timeout): waiting will not free it; force-release "
            "it first"
        )
    return status.applied


def _no_scripts_hint(target: Target) -> str:
    if target.convention == "knex":
        return (
            f"{target.name} uses Knex, whose migrations are JavaScript: applying or rolling back "
            "needs SQL scripts imported for it (ops import --dir PATH)"
        )
    return f"no migration scripts are imported for {target.name} (ops import --dir PATH)"


def _plan_error(target: Target, error: engine.EngineError) -> ServiceError:
    if not target.scripts.exists():
        return ServiceError(_no_scripts_hint(target))
    return ServiceError(str(error))


def request_apply(
    *,
    actor: Actor,
    target: Target,
    reason: str = "",
    to_version: str | None = None,
    dry_run: bool = False,
    non_transactional: bool = False,
    confirm_name: str | None = None,
    incident: Incident | None = None,
) -> Operation:
    """Apply pending migrations (all, or up to ``to_version``), or preview them (dry run)."""
    if dry_run:
        require_permission(actor, "migrations_ops.dry_run_migrations", "dry-run migrations")
        reason = (reason or "").strip() or "dry run"
    else:
        require_permission(actor, "migrations_ops.run_migrations", "apply migrations")
        reason = _require_reason(reason, "apply migrations")
        _require_confirmation(target, confirm_name, "confirm applying migrations")
    scripts = engine_scripts(target)
    if not scripts:
        raise ServiceError(_no_scripts_hint(target))
    applied = _live_books(target, refuse_stale_lock=True)
    try:
        chosen = engine.plan.pending(applied, scripts, to_version)
    except engine.EngineError as error:
        raise _plan_error(target, error) from None
    if not chosen:
        raise ServiceError(f"nothing to apply on {target.name}: every imported script is applied")
    return _create_operation(
        actor=actor,
        target=target,
        kind=OperationKind.APPLY,
        reason=reason,
        params={
            "dry_run": dry_run,
            "to_version": to_version,
            "non_transactional": non_transactional,
            "versions": [script.version for script in chosen],
            "migrations": [script.filename for script in chosen],
        },
        incident=incident,
    )


def request_rollback(
    *,
    actor: Actor,
    target: Target,
    reason: str,
    version: str | None = None,
    dry_run: bool = False,
    out_of_order: bool = False,
    non_transactional: bool = False,
    confirm_name: str | None = None,
    incident: Incident | None = None,
) -> Operation:
    """Roll back one migration: the latest applied unless ``version`` (older ones need
    ``out_of_order``). Its down SQL and the removal of its book entry run in one transaction."""
    if dry_run:
        require_permission(actor, "migrations_ops.dry_run_migrations", "dry-run rollbacks")
        reason = (reason or "").strip() or "dry run"
    else:
        require_permission(actor, "migrations_ops.run_migrations", "roll back migrations")
        reason = _require_reason(reason, "roll back a migration")
        _require_confirmation(target, confirm_name, "confirm the rollback")
    applied = _live_books(target, refuse_stale_lock=True)
    try:
        entry, script = engine.plan.rollback_choice(
            applied, engine_scripts(target), version, out_of_order=out_of_order
        )
    except engine.EngineError as error:
        raise _plan_error(target, error) from None
    return _create_operation(
        actor=actor,
        target=target,
        kind=OperationKind.ROLLBACK,
        reason=reason,
        params={
            "dry_run": dry_run,
            "version": script.version,
            "book_name": entry.name,
            "migration": script.filename,
            "out_of_order": out_of_order,
            "non_transactional": non_transactional,
        },
        incident=incident,
    )


def request_mark(
    *,
    actor: Actor,
    target: Target,
    version: str,
    reason: str,
    applied: bool,
    confirm_name: str | None = None,
    incident: Incident | None = None,
) -> Operation:
    """Fix the books without running SQL (the runbook's "reset migration tracking")."""
    require_permission(actor, "migrations_ops.fix_books", "fix the books")
    reason = _require_reason(reason, "fix the books")
    _require_confirmation(target, confirm_name, "confirm the change to its books")
    books = _live_books(target)
    if applied:
        script = next(iter(engine_scripts(target, version=version)), None)
        if script is None:
            raise ServiceError(f"unknown version {version} for {target.name}: import it first")
        if engine.plan.applied_for(script, books) is not None:
            raise ServiceError(f"{script.filename} is already recorded as applied")
        kind, params = OperationKind.MARK_APPLIED, {"book_name": script.filename}
    else:
        entry = next(
            (e for e in books if engine.plan.version_of(e.name) == version or e.name == version),
            None,
        )
        if entry is None:
            raise ServiceError(f"version {version} is not recorded as applied on {target.name}")
        kind, params = OperationKind.MARK_ROLLED_BACK, {"book_name": entry.name}
    return _create_operation(
        actor=actor,
        target=target,
        kind=kind,
        reason=reason,
        params={"version": version, **params},
        incident=incident,
    )


def request_verify(
    *, actor: Actor, target: Target, reason: str = "", incident: Incident | None = None
) -> Operation:
    require_permission(actor, "migrations_ops.verify_target", "verify targets")
    return _create_operation(
        actor=actor,
        target=target,
        kind=OperationKind.VERIFY,
        reason=(reason or "").strip() or "verify",
        params={},
        incident=incident,
    )


def request_cleanup(
    *,
    actor: Actor,
    target: Target,
    reason: str,
    confirm_name: str | None = None,
    incident: Incident | None = None,
) -> Operation:
    """The runbook's ``migrate:cleanup``: a stale lock row goes, a malformed lock table is
    repaired; a lock still within its timeout is left alone."""
    require_permission(actor, "migrations_ops.cleanup_target", "clean up lock tables")
    reason = _require_reason(reason, "clean up the lock table")
    _require_confirmation(target, confirm_name, "confirm the cleanup")
    _live_books(target)
    return _create_operation(
        actor=actor,
        target=target,
        kind=OperationKind.CLEANUP,
        reason=reason,
        params={},
        incident=incident,
    )


# --- running them (in the task) ----------------------------------------------------------------
def lock_holder(operation: Operation) -> str:
    """What an operation writes as the holder of the target's migration lock (where the
    lock table keeps one)."""
    return f"opsconsole operation #{operation.pk} ({operation.requested_by_name})"


def _run_settings(operation: Operation) -> engine.RunSettings:
    target = operation.target
    return engine.RunSettings(
        holder=lock_holder(operation),
        lock_wait_seconds=target.lock_timeout_seconds,
        max_retries=target.max_retries,
        statement_timeout_seconds=target.statement_timeout_seconds,
        dry_run=bool(operation.params.get("dry_run")),
        allow_non_transactional=bool(operation.params.get("non_transactional")),
    )


def _logger(log: list[str]):
    return lambda text: log.append(_log_line(text))


def _run_apply(operation: Operation, log: list[str]) -> dict:
    target = operation.target
    convention = engine.get_convention(target.convention)
    scripts = engine_scripts(target)
    with open_target(target) as connection:
        applied = convention.read_applied(connection)
        chosen = engine.plan.pending(applied, scripts, operation.params.get("to_version"))
        if [s.version for s in chosen] != operation.params["versions"]:
            raise engine.EngineError(
                "the books changed since the request: pending now "
                f"{', '.join(s.filename for s in chosen) or 'nothing'}; look again and re-request"
            )
        steps = [engine.Step("up", script, script.filename) for script in chosen]
        return _run_steps(operation, convention, connection, steps, log)


def _run_rollback(operation: Operation, log: list[str]) -> dict:
    target = operation.target
    convention = engine.get_convention(target.convention)
    params = operation.params
    with open_target(target) as connection:
        applied = convention.read_applied(connection)
        try:
            entry, script = engine.plan.rollback_choice(
                applied,
                # The script chosen at the request (a target may keep hundreds).
                engine_scripts(target, version=params["version"]),
                params["version"],
                out_of_order=params.get("out_of_order", False),
            )
        except engine.plan.PlanError as error:
            raise engine.EngineError(f"the books changed since the request: {error}") from None
        if entry.name != params["book_name"]:
            raise engine.EngineError(
                f"the books changed since the request ({entry.name} instead of "
                f"{params['book_name']}); look again and re-request"
            )
        steps = [engine.Step("down", script, entry.name)]
        return _run_steps(operation, convention, connection, steps, log)


def _run_steps(operation: Operation, convention, connection, steps, log: list[str]) -> dict:
    report = engine.run_migrations(
        connection, convention, steps, _run_settings(operation), _logger(log)
    )
    # read_applied has checked the tables on this connection
    observe_lock(operation.target, convention.read_lock(connection, check_tables=False))
    return report.as_dict()


def _run_mark(operation: Operation, log: list[str]) -> dict:
    target = operation.target
    convention = engine.get_convention(target.convention)
    name = operation.params["book_name"]
    marking_applied = operation.kind == OperationKind.MARK_APPLIED
    with open_target(target) as connection:
        before = [m.as_dict() for m in convention.read_applied(connection)]
        changes = engine.mark_books(
            connection,
            convention,
            applied=[name] if marking_applied else [],
            removed=[] if marking_applied else [name],
        )
        after = [m.as_dict() for m in convention.read_applied(connection)]
    for change in changes:
        log.append(_log_line(change))
    return {"changes": changes, "before": before, "after": after}


def _run_verify(operation: Operation, log: list[str]) -> dict:
    target = operation.target
    convention = engine.get_convention(target.convention)
    rows = list(target.scripts.all())
    scripts = engine_scripts(target)
    with open_target(target) as connection:
        applied = convention.read_applied(connection)
        lock = convention.read_lock(connection)
        invalid = engine.invalid_indexes(connection)
    observation = observe_lock(target, lock)
    if scripts:
        drifted = {row.filename: drift_description(row) for row in rows if row.drift_checksum}
        problems = engine.plan.verify_books(applied, scripts, drifted=drifted)
    else:
        problems = [engine.plan.Problem("no_scripts", _no_scripts_hint(target))]
    stale = engine.plan.lock_problem(
        bool(observation.held), observation.since, timezone.now(), target.lock_timeout
    )
    problems += [stale] if stale else []
    problems += [
        engine.plan.Problem(
            "invalid_index",
            f"index {index.name} on {index.table} is INVALID (left by a failed concurrent "
            f"build): drop and rebuild it",
        )
        for index in invalid
    ]
    for problem in problems:
        log.append(_log_line(f"{problem.code}: {problem.message}"))
    log.append(_log_line(f"verify: {len(problems)} problem(s)"))
    return {
        "ok": not problems,
        "problems": [problem.as_dict() for problem in problems],
        "applied": len(applied),
        "scripts": len(scripts),
    }


def drift_description(row: MigrationScript) -> str:
    return (
        f"the folder's SQL (checksum {row.drift_checksum[:12]}) differs from the SQL imported "
        f"(checksum {row.checksum[:12]}), seen {row.drift_detected_at:%Y-%m-%d %H:%M} UTC"
    )


def _run_cleanup(operation: Operation, log: list[str]) -> dict:
    target = operation.target
    convention = engine.get_convention(target.convention)
    with open_target(target) as connection:
        lock = convention.read_lock(connection)
        observation = observe_lock(target, lock)
        stale = observation.state(timezone.now(), target.lock_timeout) == LockState.STALE
        changes = convention.repair_lock_table(connection, release=stale, expected_rows=lock.rows)
        after = convention.read_lock(connection)
    observe_lock(target, after)
    if lock.held and not stale:
        changes.append("the lock is held but not stale: left alone")
    for change in changes or ["nothing to clean up"]:
        log.append(_log_line(change))
    return {"changes": changes, "before": lock.as_dict(), "after": after.as_dict()}


RUNNERS = {
    OperationKind.FORCE_UNLOCK: _run_force_unlock,
    OperationKind.APPLY: _run_apply,
    OperationKind.ROLLBACK: _run_rollback,
    OperationKind.MARK_APPLIED: _run_mark,
    OperationKind.MARK_ROLLED_BACK: _run_mark,
    OperationKind.VERIFY: _run_verify,
    OperationKind.CLEANUP: _run_cleanup,
}
