"""Asking for an operation (every ``request_*``) and the two-person rule that decides it."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from incidents.models import Incident, IncidentStatus
from migrations_ops import engine, plain_rows
from migrations_ops.actors import Actor
from migrations_ops.models import (
    ACTIVE_STATUSES,
    LockObservation,
    LockState,
    Operation,
    OperationKind,
    OperationStatus,
    Target,
)
from migrations_ops.services.audit import record_audit_event
from migrations_ops.services.errors import (
    InvalidRequest,
    OperationInProgress,
    OperationNotFound,
    PermissionDenied,
    ServiceError,
    TargetUnavailable,
    _require_confirmation,
    _require_reason,
    _storable,
    require_permission,
)
from migrations_ops.services.execution import (
    _append_log,
    _log_line,
    _note_on_incidents,
    send_operation,
)
from migrations_ops.services.observations import _read_live, observe_lock, read_target_status
from migrations_ops.services.scripts import _no_scripts_hint, engine_scripts, script_summaries

FORCE_UNLOCK_PERMISSION = "migrations_ops.force_unlock_target"


def get_operation(operation_id: int) -> Operation:
    try:
        return Operation.objects.select_related("target").get(pk=operation_id)
    except Operation.DoesNotExist:
        raise OperationNotFound(f"no operation #{operation_id}") from None


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
    books: LiveBooks | None = None,
) -> Operation:
    """Write the operation and its audit event; ``incident``: the one it serves, if any;
    ``books``: the request's live read, whose lock observation is written with them."""
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
    observing = books is not None and books.observation is None
    written = False
    try:
        with transaction.atomic():
            _refuse_closed_incident(incident)
            plain_rows.insert(operation)  # on every request: spare the ORM's insert machinery
            if observing:
                # After the insert, as _finish writes it after its update: a request waiting on
                # a finishing operation's row (the one-active-operation key) holds no
                # observation that operation's end needs.
                books.observe()
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
        written = True
    except IntegrityError:
        active = (
            Operation.objects.filter(target=target, status__in=ACTIVE_STATUSES)
            .exclude(kind=OperationKind.VERIFY)
            .first()
        )
        if active is not None:
            raise OperationInProgress(
                f"operation #{active.pk} ({active.get_kind_display()}, {active.status}) is "
                f"already in progress on {target.name}: wait for it to finish",
                operation_id=active.pk,
            ) from None
        # The operation in the way finished between this insert and this look: the target
        # changed under the request, which is refused rather than run on what it saw before.
        finished = (
            Operation.objects.filter(target=target)
            .exclude(kind=OperationKind.VERIFY)
            .order_by("-pk")
            .first()
        )
        if finished is None:
            raise
        raise OperationInProgress(
            f"operation #{finished.pk} ({finished.get_kind_display()}) was in progress on "
            f"{target.name} and has just ended ({finished.status}): look at what it did, then "
            "ask again",
            operation_id=finished.pk,
        ) from None
    finally:
        if observing and not written:
            books.observation = None  # rolled back with the rest: _live_books writes it alone
    return operation


def _refuse_closed_incident(incident: Incident | None) -> None:
    """An operation may serve any incident not yet closed. Its row is locked until the
    operation is written, so the incident cannot close in between. FOR NO KEY UPDATE: it does
    not stop a timeline entry from referring to the incident, which a transaction holding the
    audit chain's lock may be writing (``audit_chain``: that lock must be the last one)."""
    if incident is None:
        return
    status = (
        Incident.objects.select_for_update(no_key=True)
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
        decision_reason=_storable((reason or "").strip(), "reason"),
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


@dataclass
class LiveBooks:
    """A request's live read of a target: its books, and the lock observation still to write
    (``observation`` None until written)."""

    target: Target
    applied: list[engine.AppliedMigration]
    lock: engine.LockState
    observation: LockObservation | None = None

    def observe(self) -> None:
        """Write the lock observation (in the caller's transaction, if any)."""
        self.observation = observe_lock(self.target, self.lock)


@contextlib.contextmanager
def _live_books(target: Target, *, refuse_stale_lock: bool = False) -> Iterator[LiveBooks]:
    """The target's books read live for a request. A free lock's observation is written with
    the operation the request writes (``_create_operation``: one commit for both), or on its
    own when the request stops before; a held lock's, and a failed read's, at once: the checks
    here need its clock, and the operator's refusal must show what it saw."""
    lock, applied, error = _read_live(target)
    if error:
        observe_lock(target, None, error=error)
        raise TargetUnavailable(f"{target.name}: {error}")
    books = LiveBooks(target, applied, lock)
    if lock.held:
        books.observe()
        _refuse_stale(books.observation, target, refuse_stale_lock)
    try:
        yield books
    finally:
        if books.observation is None:
            books.observe()


def _refuse_stale(observation: LockObservation, target: Target, refuse: bool) -> None:
    if refuse and observation.state(timezone.now(), target.lock_timeout) == LockState.STALE:
        holder = f" by {observation.holder}" if observation.holder else ""
        raise ServiceError(
            f"the migration lock of {target.name} is stale (held{holder} longer than its "
            f"{target.lock_timeout_seconds} s timeout): waiting will not free it; force-release "
            "it first"
        )


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
    scripts = script_summaries(target)
    if not scripts:
        raise ServiceError(_no_scripts_hint(target))
    with _live_books(target, refuse_stale_lock=True) as books:
        try:
            chosen = engine.plan.pending(books.applied, scripts, to_version)
        except engine.EngineError as error:
            raise _plan_error(target, error) from None
        if not chosen:
            raise ServiceError(
                f"nothing to apply on {target.name}: every imported script is applied"
            )
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
            books=books,
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
    with _live_books(target, refuse_stale_lock=True) as books:
        try:
            entry, script = engine.plan.rollback_choice(
                books.applied, script_summaries(target), version, out_of_order=out_of_order
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
            books=books,
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
    with _live_books(target) as books:
        if applied:
            script = next(iter(engine_scripts(target, versions=[version])), None)
            if script is None:
                raise ServiceError(f"unknown version {version} for {target.name}: import it first")
            if engine.plan.applied_for(script, books.applied) is not None:
                raise ServiceError(f"{script.filename} is already recorded as applied")
            kind, params = OperationKind.MARK_APPLIED, {"book_name": script.filename}
        else:
            entry = next(
                (
                    e
                    for e in books.applied
                    if engine.plan.version_of(e.name) == version or e.name == version
                ),
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
            books=books,
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
    with _live_books(target) as books:
        return _create_operation(
            actor=actor,
            target=target,
            kind=OperationKind.CLEANUP,
            reason=reason,
            params={},
            incident=incident,
            books=books,
        )
