"""Every write the console makes: to its own books and, through the engine, to targets.

Admin, CLI, API and tasks are thin doors onto these functions, so a rule enforced here holds
for all of them. Errors meant for the user are ``ServiceError`` with a one-line message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, transaction
from django.db import connection as console_connection
from django.db.models import Case, DateTimeField, F, Max, Q, Value, When
from django.db.models.functions import Coalesce
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from incidents.models import Incident, IncidentStatus
from migrations_ops import audit_chain, engine, plain_rows, selectors
from migrations_ops.actors import Actor
from migrations_ops.fields import SecretKeyError
from migrations_ops.models import (
    ACTIVE_STATUSES,
    FLAG_FIELDS,
    TARGET_SETTINGS,
    AlertThresholds,
    ApiToken,
    AuditEvent,
    Door,
    Environment,
    FlagChange,
    FlagChangeKind,
    FlagStage,
    LockObservation,
    LockState,
    MigrationScript,
    Operation,
    OperationKind,
    OperationStatus,
    Target,
    WorkerHeartbeat,
)
from opsconsole import middleware as request_context
from opsconsole.cache import cache_reconnected

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
    subject=None,
    before: dict | None = None,
    after: dict | None = None,
) -> AuditEvent:
    """Append an event to the audit trail's hash chain, in the caller's transaction: write it
    last there (``audit_chain``: the chain's lock is the last one a transaction takes).

    ``subject``: the object a change is about (its History page lists the event), with the
    changed fields' ``before`` and ``after`` values. The request's id and client address come
    from the request being served (``opsconsole.middleware``), if any."""
    context = request_context.current()
    event = AuditEvent(
        actor=actor.user,
        actor_name=actor.name[:150],
        door=actor.door,
        action=action,
        target=target,
        target_name=target.name if target else "",
        operation=operation,
        details=details or {},
        ip=context.ip,
        request_id=context.request_id,
        object_model=subject._meta.label_lower if subject is not None else "",
        object_id=subject.pk if subject is not None else None,
        before=before or {},
        after=after or {},
    )
    return audit_chain.append(event)


def record_audit_events(events: list[AuditEvent]) -> list[AuditEvent]:
    """Append many ready-made events at once, chained in list order (imports, benchmarks)."""
    return audit_chain.append_many(AuditEvent, events)


def record_history_export(*, actor: Actor, filters: dict) -> AuditEvent:
    """An export of the history is itself on it, with the filters and search it was made with
    (recorded as it starts: how many rows it holds is known only once streamed)."""
    require_permission(actor, "migrations_ops.view_auditevent", "export the audit trail")
    return record_audit_event(actor, "history.exported", details={"filters": filters})


# --- logins (Django's auth signals: every way into the admin's login goes through them) -------
@receiver(user_logged_in, dispatch_uid="audit_user_logged_in")
def _logged_in(sender, request, user, **kwargs) -> None:
    record_audit_event(Actor.for_user(user, Door.ADMIN), "user.logged_in")


@receiver(user_logged_out, dispatch_uid="audit_user_logged_out")
def _logged_out(sender, request, user, **kwargs) -> None:
    if user is not None:
        record_audit_event(Actor.for_user(user, Door.ADMIN), "user.logged_out")


@receiver(user_login_failed, dispatch_uid="audit_user_login_failed")
def _login_failed(sender, credentials, request=None, **kwargs) -> None:
    """The user name tried, never the password (Django hides it from ``credentials`` too)."""
    field = get_user_model().USERNAME_FIELD
    tried = str(credentials.get(field) or credentials.get("username") or "")[:150]
    record_audit_event(
        Actor(user=None, name=tried or "(no user name)", door=Door.ADMIN),
        "user.login_failed",
        details={"username": tried},
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
    if creating:  # the flags it starts with; every later change is a FlagChange
        details["flags"] = selectors.flags_of(target)
    with transaction.atomic():
        stored = None if creating else Target.objects.filter(pk=target.pk).first()
        before, after = _target_changes(stored, target, changed_fields)
        target.save()
        record_audit_event(
            actor,
            "target.registered" if creating else "target.changed",
            target=target,
            details=details,
            subject=target,
            before=before,
            after=after,
        )
    return target


def _target_changes(stored: Target | None, target: Target, fields: list[str]) -> tuple[dict, dict]:
    """The changed settings as they were and became; the connection URL only masked (a
    changed password shows as such, never itself)."""

    def shown(row: Target, name: str):
        return row.masked_url if name == "connection_url" else getattr(row, name)

    before, after = {}, {}
    for name in fields:
        if name not in TARGET_SETTINGS:
            continue
        new = shown(target, name)
        if stored is None:
            after[name] = new
            continue
        if getattr(stored, name) == getattr(target, name):
            continue
        old = shown(stored, name)
        if old == new:  # only the URL's password changed
            new = f"{new} (password changed)"
        before[name], after[name] = old, new
    return before, after


def rotate_target_secrets(*, actor: Actor) -> int:
    """Encrypt every target's connection URL again with the first key of TARGET_SECRET_KEY
    (after a new key was put first): afterwards the older keys can be dropped. Returns how
    many URLs were re-encrypted."""
    require_permission(actor, "migrations_ops.change_target", "change targets")
    try:
        with transaction.atomic():
            # Read with whichever key opens each URL, written with the first.
            urls = list(Target.objects.select_for_update().values_list("pk", "connection_url"))
            for pk, url in urls:
                Target.objects.filter(pk=pk).update(connection_url=url)
            record_audit_event(actor, "targets.secrets_rotated", details={"targets": len(urls)})
    except SecretKeyError as error:
        raise ServiceError(str(error)) from None
    return len(urls)


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
_kept_target_connections = engine.connection.ConnectionCache(
    max_idle=settings.TARGET_KEEP_CONNECTIONS_MAX
)


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
    lock, applied, error = _read_live(target, include_applied=include_applied)
    observation = observe_lock(target, lock, error=error or "")
    return TargetStatus(target, observation, applied, error)


def _read_live(
    target: Target, *, include_applied: bool = True
) -> tuple[engine.LockState | None, list[engine.AppliedMigration] | None, str | None]:
    """The lock and (with ``include_applied``) the books as the target has them now; or the
    reason they could not be read."""
    convention = engine.get_convention(target.convention)
    try:
        with open_target(target) as connection:
            if include_applied:
                lock, applied = convention.read(connection)
            else:
                lock, applied = convention.read_lock(connection), None
    except engine.EngineError as error:
        return None, None, str(error)
    return lock, applied, None


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


def observe_locks(readings: list[tuple[Target, engine.LockState | None, str]]) -> None:
    """``observe_lock`` for many targets read one after the other (each with its
    ``lock_observation`` loaded): the free locks that read the same -- most of them, most of
    the time -- in a single UPDATE; the others, and a target's first reading, each on its
    own."""
    now = timezone.now()
    free: dict[str, tuple[dict, list[Target]]] = {}
    for target, lock, error in readings:
        if lock is None or lock.held or selectors.observation_of(target) is None:
            observe_lock(target, lock, error=error)
            continue
        changes = _observed(lock, error, now)
        key = json.dumps(changes, sort_keys=True, cls=DjangoJSONEncoder)
        free.setdefault(key, (changes, []))[1].append(target)
    for changes, targets in free.values():
        _write_observations([target.pk for target in targets], changes)
        for target in targets:
            for name, value in changes.items():
                setattr(target.lock_observation, name, value)


def _observed(lock: engine.LockState | None, error: str, now: dt.datetime) -> dict:
    """The observation's fields as a read at ``now`` found them (a held lock's first-seen
    time is the row's to keep, see ``_record_observation``); ``lock`` None: the read failed
    with ``error``."""
    if lock is None:
        return {"held": None, "first_seen_held_at": None, "error": error, "observed_at": now}
    return {
        "held": lock.held,
        "rows": lock.rows,
        "holder": lock.holder or "",
        "locked_at": lock.locked_at,
        "error": "",
        "first_seen_held_at": now if lock.held else None,
        "observed_at": now,
    }


def _record_observation(
    target: Target, lock: engine.LockState | None, *, error: str = ""
) -> dict | None:
    """``observe_lock`` in one UPDATE that compares with the row as it is, so readers of the
    same target at once apply their reads in turn, with no transaction of its own (it joins
    the caller's). Returns the row's fields when the read alone decides them all (a free
    lock), else None: what a held lock's clock or a failed read keeps is in the row."""
    now = timezone.now()
    changes = _observed(lock, error, now)
    update = changes
    if changes["first_seen_held_at"] is not None:
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

    def write() -> int:
        if update is changes:  # decided by the read alone, as most reads are: plain SQL
            return _write_observations([target.pk], changes)
        return LockObservation.objects.filter(target=target).update(**update)

    if not write():
        try:
            with transaction.atomic():  # the target's first read
                LockObservation.objects.create(target=target, **changes)
        except IntegrityError:  # another reader's first read came first
            write()
    return {"target": target, **changes} if lock is not None and not lock.held else None


def _write_observations(target_ids: list[int], changes: dict) -> int:
    """Write ``changes`` on the observations of ``target_ids``: once for every status read
    and run, so in plain SQL (``plain_rows``). Returns how many rows were written."""
    marks = ", ".join(["%s"] * len(target_ids))
    where = f"{plain_rows.quoted(LockObservation, 'target')} IN ({marks})"
    return plain_rows.update(LockObservation, changes, where, target_ids)


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
    operation = _claim(operation_id, worker)
    if operation is None:
        logger.info("operation %s was not queued any more; nothing to do", operation_id)
        return None
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


def _claim(operation_id: int, worker: str) -> Operation | None:
    """Mark a queued operation running and load it with its target; None if it was not queued.

    One UPDATE ... RETURNING, joined to the target's row on PostgreSQL (SQLite cannot put an
    UPDATE in a WITH: the target follows by its key), in plain SQL (``plain_rows``): through
    the ORM they cost an UPDATE, a SELECT joining the target, and the query compiler's work on
    both -- more than a small migration's whole run on its target (bench/rollback_overhead.py)."""
    quoted = plain_rows.quoted
    column = {name: quoted(Operation, name) for name in _CLAIMED_FIELDS}
    now = Operation._meta.get_field("started_at").get_db_prep_value(
        timezone.now(), console_connection
    )
    query = (
        f"UPDATE {quoted(Operation)} SET {column['status']} = %s, "  # noqa: S608 (quoted names)
        f"{column['started_at']} = %s, {column['heartbeat_at']} = %s, {column['worker']} = %s "
        f"WHERE {column['id']} = %s AND {column['status']} = %s "
        f"RETURNING {plain_rows.columns(Operation)}"
    )
    joined = console_connection.vendor == "postgresql"
    if joined:
        query = (
            f"WITH claimed AS ({query}) SELECT claimed.*, {plain_rows.columns(Target, 'target')} "  # noqa: S608 (quoted names)
            f"FROM claimed JOIN {quoted(Target)} AS target "
            f"ON target.{quoted(Target, 'id')} = claimed.{quoted(Operation, 'target')}"
        )
    with console_connection.cursor() as cursor:
        cursor.execute(
            query,
            [OperationStatus.RUNNING, now, now, worker, operation_id, OperationStatus.QUEUED],
        )
        claimed = cursor.fetchone()
    if claimed is None:
        return None
    count = len(Operation._meta.concrete_fields)
    operation = plain_rows.instance(Operation, claimed[:count])
    if joined:
        operation.target = plain_rows.instance(Target, claimed[count:])
    else:
        (operation.target,) = plain_rows.instances(
            Target, f"{quoted(Target, 'id')} = %s", [operation.target_id]
        )
    return operation


_CLAIMED_FIELDS = ("id", "status", "started_at", "heartbeat_at", "worker")


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
        finished = ("status", "finished_at", "result", "error", "log")
        plain_rows.update(
            Operation,
            {name: getattr(operation, name) for name in finished},
            f"{plain_rows.quoted(Operation, 'id')} = %s",
            [operation.pk],
        )
        if operation.lock_after is not None:
            observe_lock(operation.target, operation.lock_after)
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
    """Run periodically (the ``migrations_ops.sweep_operations`` task, which ``make beat``
    runs in beat's own process, so it needs no worker: opsconsole/beat.py) or by hand (``ops
    sweep``). Two sweeps at once (two beats) are harmless: marking lost and expiring are
    conditional updates, which one of them wins; sending twice is a duplicate message.

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


# --- worker liveness ---------------------------------------------------------------------------
# How long a worker's row is kept once it has fallen silent (a renamed or removed worker).
WORKER_ROWS_KEPT = dt.timedelta(days=7)


def record_worker_alive(
    hostname: str, *, queues: Sequence[str], pid: int | None, now: dt.datetime | None = None
) -> None:
    """The worker ``hostname`` is alive now (see models.WorkerHeartbeat). A worker seen again
    after it stopped, or after a silence, counts as started anew."""
    now = now or timezone.now()
    silence = dt.timedelta(seconds=settings.WORKER_SEEN_WITHIN)
    fields = {"queues": sorted(queues), "pid": pid, "last_seen_at": now, "stopped_at": None}
    kept = WorkerHeartbeat.objects.filter(
        hostname=hostname, stopped_at__isnull=True, last_seen_at__gte=now - silence
    ).update(**fields)
    if not kept:
        WorkerHeartbeat.objects.update_or_create(
            hostname=hostname, defaults={**fields, "started_at": now}
        )


def record_worker_stopped(hostname: str, now: dt.datetime | None = None) -> None:
    """The worker shut down cleanly: it is not alive any more, though seen a moment ago."""
    now = now or timezone.now()
    WorkerHeartbeat.objects.filter(hostname=hostname).update(last_seen_at=now, stopped_at=now)


def forget_silent_workers(now: dt.datetime | None = None) -> int:
    now = now or timezone.now()
    deleted, _ = WorkerHeartbeat.objects.filter(last_seen_at__lt=now - WORKER_ROWS_KEPT).delete()
    return deleted


class WorkerLivenessBeat:
    """In a worker's main process: records that the worker is alive at once and then every
    WORKER_HEARTBEAT_SECONDS, from a thread of its own with its own connection to the console's
    database, so a task holding the process (a solo pool) does not silence it."""

    def __init__(self, hostname: str, queues: Sequence[str]):
        self.hostname, self.queues = hostname, list(queues)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="worker-liveness-heartbeat", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and record the worker stopped."""
        self._stop.set()
        self._thread.join(timeout=settings.WORKER_HEARTBEAT_SECONDS + 5)
        with contextlib.suppress(Exception):  # shutting down: the silence will tell anyway
            record_worker_stopped(self.hostname)

    def _run(self) -> None:
        try:
            with contextlib.suppress(Exception):
                forget_silent_workers()
            while True:
                try:
                    record_worker_alive(self.hostname, queues=self.queues, pid=os.getpid())
                except Exception as error:  # the console's database away for a moment
                    logger.warning("worker %s: liveness not recorded: %s", self.hostname, error)
                    console_connection.close()
                if self._stop.wait(settings.WORKER_HEARTBEAT_SECONDS):
                    return
        finally:
            console_connection.close()


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


def script_summaries(target: Target) -> list[engine.plan.ScriptSummary]:
    """The target's stored scripts in version order, as planning needs them: without their up
    SQL and statement lists, which for hundreds of scripts would cost milliseconds a request."""
    # The down SQL is a few lines where the rest is not: the up SQL and both statement lists.
    return [
        engine.plan.ScriptSummary(version, name, filename, checksum, bool(down.strip()))
        for version, name, filename, checksum, down in _script_rows(
            target, ("version", "name", "filename", "checksum", "down_sql"), None
        )
    ]


_ENGINE_SCRIPT_FIELDS = (
    "version",
    "name",
    "filename",
    "layout",
    "up_sql",
    "down_sql",
    "up_statements",
    "down_statements",
    "transactional",
    "needs_no_transaction",
    "checksum",
)


def engine_scripts(
    target: Target, *, versions: Sequence[str] | None = None
) -> list[engine.MigrationScript]:
    """The target's stored scripts in the engine's own shape, SQL included; only those of
    ``versions`` if given (plan with ``script_summaries``, then load what was chosen)."""
    scripts = []
    for values in _script_rows(target, _ENGINE_SCRIPT_FIELDS, versions):
        row = dict(zip(_ENGINE_SCRIPT_FIELDS, values, strict=True))
        up, down = row.pop("up_statements"), row.pop("down_statements")
        outside = row.pop("needs_no_transaction")
        scripts.append(
            engine.MigrationScript(
                **row,
                up_statements=tuple(engine.Statement(s["sql"], s["line"]) for s in up),
                down_statements=tuple(engine.Statement(s["sql"], s["line"]) for s in down),
                needs_no_transaction=tuple(outside),
            )
        )
    return scripts


def _script_rows(
    target: Target, fields: Sequence[str], versions: Sequence[str] | None
) -> list[tuple]:
    """``fields`` of the target's scripts (those of ``versions`` if given), in version order:
    read on every request and run, so in plain SQL (``plain_rows``)."""
    version = plain_rows.quoted(MigrationScript, "version")
    where, params = f"{plain_rows.quoted(MigrationScript, 'target')} = %s", [target.pk]
    if versions is not None:
        if not versions:
            return []
        where += f" AND {version} IN ({', '.join(['%s'] * len(versions))})"
        params += list(versions)
    return plain_rows.select(MigrationScript, fields, f"{where} ORDER BY {version}", params)


# --- migration operations ----------------------------------------------------------------------
# What PostgreSQL text cannot hold: NUL, and a UTF-16 surrogate standing alone (JSON's
# "\ud800", or a command-line argument that was not UTF-8).
UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")


def _storable(text: str, what: str) -> str:
    if UNSTORABLE_TEXT.search(text):
        raise InvalidRequest(
            f"the {what} holds a NUL character or text that is not UTF-8, which cannot be stored"
        )
    return text


def _require_reason(reason: str, what: str) -> str:
    reason = _storable((reason or "").strip(), "reason")
    if not reason:
        raise InvalidRequest(f"a reason is required to {what}")
    return reason


def _require_confirmation(target: Target, confirm_name: str | None, what: str) -> None:
    if target.is_production and (confirm_name or "").strip() != target.name:
        raise InvalidRequest(f"{target.name} is a production target: type its name to {what}")


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


# --- running them (in the task) ----------------------------------------------------------------
def lock_holder(operation: Operation) -> str:
    """What an operation writes as the holder of the target's migration lock (where the
    lock table keeps one)."""
    return f"opsconsole operation #{operation.pk} ({operation.requested_by_name})"


def _run_settings(operation: Operation) -> engine.RunSettings:
    target = operation.target
    return engine.RunSettings(
        holder=lock_holder(operation),
        # The auto-migrator makes each retry an operation of its own, with the flags it read.
        lock_wait_seconds=operation.params.get("lock_wait_seconds", target.lock_timeout_seconds),
        max_retries=operation.params.get("lock_retries", target.max_retries),
        statement_timeout_seconds=target.statement_timeout_seconds,
        dry_run=bool(operation.params.get("dry_run")),
        allow_non_transactional=bool(operation.params.get("non_transactional")),
    )


def _logger(log: list[str]):
    return lambda text: log.append(_log_line(text))


def _run_apply(operation: Operation, log: list[str]) -> dict:
    target = operation.target
    scripts = script_summaries(target)
    versions, to_version = operation.params["versions"], operation.params.get("to_version")
    by_version = {script.version: script for script in engine_scripts(target, versions=versions)}
    if not all(version in by_version for version in versions):
        raise engine.EngineError(
            "the imported scripts changed since the request; look again and re-request"
        )

    def check_books(applied: list[engine.AppliedMigration]) -> None:
        pending = engine.plan.pending(applied, scripts, to_version)
        if [script.version for script in pending] != versions:
            raise engine.EngineError(
                "the books changed since the request: pending now "
                f"{', '.join(s.filename for s in pending) or 'nothing'}; look again and re-request"
            )

    chosen = [by_version[version] for version in versions]
    steps = [engine.Step("up", script, script.filename) for script in chosen]
    return _run_steps(operation, steps, check_books, log)


def _run_rollback(operation: Operation, log: list[str]) -> dict:
    params = operation.params
    # The script chosen at the request (a target may keep hundreds).
    found = engine_scripts(operation.target, versions=[params["version"]])
    if not found:
        raise engine.EngineError(
            f"the script of {params['migration']} is no longer imported; look again and re-request"
        )

    def check_books(applied: list[engine.AppliedMigration]) -> None:
        try:
            entry, _ = engine.plan.rollback_choice(
                applied, found, params["version"], out_of_order=params.get("out_of_order", False)
            )
        except engine.plan.PlanError as error:
            raise engine.EngineError(f"the books changed since the request: {error}") from None
        if entry.name != params["book_name"]:
            raise engine.EngineError(
                f"the books changed since the request ({entry.name} instead of "
                f"{params['book_name']}); look again and re-request"
            )

    steps = [engine.Step("down", found[0], params["book_name"])]
    return _run_steps(operation, steps, check_books, log)


def _run_steps(operation: Operation, steps, check_books, log: list[str]) -> dict:
    """Run under the lock, where the books are checked again before any SQL runs."""
    target = operation.target
    convention = engine.get_convention(target.convention)
    with open_target(target) as connection:
        report = engine.run_migrations(
            connection,
            convention,
            steps,
            _run_settings(operation),
            _logger(log),
            check_books=check_books,
        )
        lock = report.lock_after
        if lock is None:  # the release failed: see what it left
            lock = convention.read_lock(connection, check_tables=False)
    operation.lock_after = lock
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
    drifted = {
        row.filename: drift_description(row) for row in target.scripts.exclude(drift_checksum="")
    }
    scripts = script_summaries(target)
    with open_target(target) as connection:
        applied = convention.read_applied(connection)
        lock = convention.read_lock(connection)
        invalid = engine.invalid_indexes(connection)
    observation = observe_lock(target, lock)
    if scripts:
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


# --- runtime flags -----------------------------------------------------------------------------
CHANGE_FLAGS_PERMISSION = "migrations_ops.change_flags"
_TRUE_WORDS = {"true", "on", "yes", "1"}
_FALSE_WORDS = {"false", "off", "no", "0"}


def parse_flag_value(name: str, value):
    """A flag's value from a door: a bool or int as is, or text such as ``false`` or ``3``.
    Bounds are checked later, by the model fields' own validators."""
    field = Target._meta.get_field(FLAG_FIELDS[name])
    if field.get_internal_type() == "BooleanField":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in _TRUE_WORDS | _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise InvalidRequest(f"{name} must be true or false, not {value!r}")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise InvalidRequest(f"{name} must be a whole number, not {value!r}") from None


def _clean_flag_changes(changes: dict) -> dict:
    """Runbook name → validated value, or InvalidRequest naming the first bad one."""
    if not changes:
        raise InvalidRequest("nothing to change: no flag given")
    unknown = sorted(set(changes) - set(FLAG_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown flag {', '.join(unknown)} (known: {', '.join(FLAG_FIELDS)})")
    cleaned = {}
    for name, raw in changes.items():
        value = parse_flag_value(name, raw)
        try:
            Target._meta.get_field(FLAG_FIELDS[name]).run_validators(value)
        except ValidationError as error:
            raise InvalidRequest(f"{name}={value}: {' '.join(error.messages)}") from None
        cleaned[name] = value
    return cleaned


def _locked_targets(targets) -> list[Target]:
    """The targets' rows, locked in id order (two disables of overlapping sets never deadlock)."""
    ids = sorted({target.pk for target in targets})
    return list(Target.objects.select_for_update().filter(pk__in=ids).order_by("pk"))


def _write_flag_change(
    actor: Actor, target: Target, values: dict, *, reason: str, kind: str, stage_after: str
) -> FlagChange:
    """Set ``values`` on the locked ``target`` and record it: the FlagChange (only the flags
    whose value changed), the audit event and the open incidents' timelines."""
    before, after = {}, {}
    for name, value in values.items():
        attribute = FLAG_FIELDS[name]
        if getattr(target, attribute) != value:
            before[name], after[name] = getattr(target, attribute), value
            setattr(target, attribute, value)
    stage_before = target.flag_stage
    target.flag_stage = stage_after
    target.save(update_fields=[FLAG_FIELDS[name] for name in after] + ["flag_stage", "updated_at"])
    change = FlagChange.objects.create(
        target=target,
        actor=actor.user,
        actor_name=actor.name,
        door=actor.door,
        kind=kind,
        reason=reason,
        before=before,
        after=after,
        stage_before=stage_before,
        stage_after=stage_after,
    )
    record_audit_event(
        actor,
        "flags.changed",
        target=target,
        details={
            "kind": kind,
            "before": before,
            "after": after,
            "stage_before": stage_before,
            "stage_after": stage_after,
            "reason": reason,
            "flag_change": change.pk,
        },
        subject=target,  # on the target's History page
        before=before,
        after=after,
    )
    _note_flag_change_on_incidents(change)
    return change


def _note_flag_change_on_incidents(change: FlagChange) -> None:
    """As ``_note_on_incidents``: a failure to write a timeline is logged, and never undoes the
    flag change (the savepoint keeps the rest of the transaction)."""
    try:
        from incidents.services import record_flag_change  # incidents builds on this module

        with transaction.atomic():
            record_flag_change(change)
    except Exception:
        logger.exception("could not note flag change #%s on incident timelines", change.pk)


def change_flags(
    *, actor: Actor, target: Target, changes: dict, reason: str, kind: str = FlagChangeKind.SET
) -> FlagChange:
    """Set some of a target's runtime flags by their runbook names (``{"AUTO_MIGRATE": False}``).

    Validated against the model fields' bounds; a change that changes nothing is refused. A
    change by hand keeps the target's re-enable stage: setting AUTO_MIGRATE=false and retries 0
    by hand is not an emergency disable (use ``emergency_disable``, which starts the guided
    re-enable), and changing a flag in the middle of a re-enable leaves the next step due (that
    step sets its flags again). ``kind`` is ``set`` or ``drill``; the other kinds belong to
    ``emergency_disable`` and ``reenable_step``.
    """
    require_permission(actor, CHANGE_FLAGS_PERMISSION, "change runtime flags")
    if kind not in (FlagChangeKind.SET, FlagChangeKind.DRILL):
        raise InvalidRequest(f"a flag change by hand cannot be of kind {kind!r}")
    values = _clean_flag_changes(changes)
    reason = _require_reason(reason, "change runtime flags")
    with transaction.atomic():
        (locked,) = _locked_targets([target]) or [None]
        if locked is None:
            raise TargetNotFound(f"target {target.name!r} no longer exists")
        if all(getattr(locked, FLAG_FIELDS[name]) == value for name, value in values.items()):
            raise InvalidRequest(
                f"nothing to change: {target.name} already has {selectors.describe_flags(values)}"
            )
        change = _write_flag_change(
            actor, locked, values, reason=reason, kind=kind, stage_after=locked.flag_stage
        )
    _refresh_flags(target, locked)
    return change


def emergency_disable(*, actor: Actor, targets, reason: str) -> list[FlagChange]:
    """The runbook's "Quick Disable" (AUTO_MIGRATE=false, MIGRATION_DRY_RUN=true,
    MIGRATION_MAX_RETRIES=0) on every target in ``targets``: all or none. Each target gets
    one FlagChange and the stage ``disabled`` (from which the guided re-enable starts), even
    one disabled already: the reason is worth keeping."""
    require_permission(actor, CHANGE_FLAGS_PERMISSION, "disable auto-migration")
    reason = _require_reason(reason, "disable auto-migration")
    targets = list(targets)
    if not targets:
        raise InvalidRequest("no target to disable")
    with transaction.atomic():
        locked = _locked_targets(targets)
        missing = {t.name for t in targets} - {t.name for t in locked}
        if missing:
            raise TargetNotFound(f"unknown target {', '.join(sorted(missing))}")
        changes = [
            _write_flag_change(
                actor,
                target,
                selectors.QUICK_DISABLE,
                reason=reason,
                kind=FlagChangeKind.EMERGENCY_DISABLE,
                stage_after=FlagStage.DISABLED,
            )
            for target in locked
        ]
    by_id = {target.pk: target for target in locked}
    for target in targets:
        _refresh_flags(target, by_id[target.pk])
    return changes


def reenable_step(*, actor: Actor, target: Target, step: int, reason: str) -> FlagChange:
    """One step of the runbook's "Progressive Re-enable", only in order: 1 from an emergency
    disable, 2 after 1, 3 after 2 (which ends in the normal stage)."""
    require_permission(actor, CHANGE_FLAGS_PERMISSION, "re-enable auto-migration")
    if step not in selectors.REENABLE_STEPS:
        raise InvalidRequest(f"no re-enable step {step}: the steps are 1, 2 and 3")
    reason = _require_reason(reason, "take a re-enable step")
    definition = selectors.REENABLE_STEPS[step]
    with transaction.atomic():
        (locked,) = _locked_targets([target]) or [None]
        if locked is None:
            raise TargetNotFound(f"target {target.name!r} no longer exists")
        due = selectors.next_reenable_step(locked)
        if due is None:
            raise InvalidRequest(
                f"{target.name} is not emergency-disabled: there is no re-enable step to take"
            )
        if due != step:
            raise InvalidRequest(f"step {step} is not due on {target.name}: step {due} is next")
        change = _write_flag_change(
            actor,
            locked,
            definition.sets,
            reason=reason,
            kind=definition.kind,
            stage_after=definition.stage_after,
        )
    _refresh_flags(target, locked)
    return change


def _refresh_flags(target: Target, saved: Target) -> None:
    """The caller's instance shows what was saved (as a door prints it right after)."""
    for name in [*FLAG_FIELDS.values(), "flag_stage", "updated_at"]:
        setattr(target, name, getattr(saved, name))


# --- the auto-migrator ------------------------------------------------------------------------
# What an application runs at start-up (``ops automigrate``): obey the flags, then apply what
# is pending, each attempt an operation of its own, run in the application's own process.
AUTO_MIGRATE_BACKOFF_SECONDS = 1.0
AUTO_MIGRATE_MAX_BACKOFF_SECONDS = 30.0
AUTO_MIGRATE_POLL_SECONDS = 0.2


class AutoMigrateOutcome:
    BYPASS = "bypass"
    DISABLED = "disabled"
    UP_TO_DATE = "up_to_date"
    PREVIEWED = "previewed"
    APPLIED = "applied"
    FAILED = "failed"


@dataclass
class AutoMigrateReport:
    target: str
    outcome: str = ""
    lines: list[str] = field(default_factory=list)
    operations: list[int] = field(default_factory=list)  # ours: one per attempt
    waited_for: list[int] = field(default_factory=list)  # other migrators' operations

    @property
    def ok(self) -> bool:
        return self.outcome != AutoMigrateOutcome.FAILED


def auto_migrate(
    *,
    actor: Actor,
    target: Target,
    flags: dict,
    reason: str = "",
    backoff_seconds: float = AUTO_MIGRATE_BACKOFF_SECONDS,
    say=None,
) -> AutoMigrateReport:
    """Decide from ``flags`` (runbook names, as ``selectors.flags_of`` gives them) and migrate.

    EMERGENCY_BYPASS skips everything; AUTO_MIGRATE off does nothing; MIGRATION_DRY_RUN only
    previews. Otherwise up to 1 + MIGRATION_MAX_RETRIES attempts, each an apply operation
    waiting MIGRATION_LOCK_TIMEOUT seconds for the lock once. When another migrator's operation
    is active on the target, wait for it and look again: usually it has applied everything.
    ``say`` receives each line as it happens (the report keeps them all)."""
    missing = [name for name in FLAG_FIELDS if name not in flags]
    if missing:
        raise InvalidRequest(f"the flags of {target.name} lack {', '.join(missing)}")
    report = AutoMigrateReport(target=target.name)

    def tell(line: str) -> None:
        report.lines.append(line)
        if say is not None:
            say(line)

    if flags["EMERGENCY_BYPASS"]:
        report.outcome = AutoMigrateOutcome.BYPASS
        tell("bypass: migration logic skipped")
        return report
    if not flags["AUTO_MIGRATE"]:
        report.outcome = AutoMigrateOutcome.DISABLED
        tell("auto-migration disabled")
        return report
    dry_run = bool(flags["MIGRATION_DRY_RUN"])
    lock_timeout = int(flags["MIGRATION_LOCK_TIMEOUT"])
    attempts = 1 + int(flags["MIGRATION_MAX_RETRIES"])
    reason = (reason or "").strip() or f"auto-migration by {actor.name}"
    started = timezone.now()
    # Waiting for another migrator spends no attempt, but no more time than our attempts could.
    wait_deadline = time.monotonic() + lock_timeout * attempts
    attempt = 0
    last_error = ""
    while attempt < attempts:
        pending = _auto_pending(target)
        if not pending:
            return _auto_up_to_date(report, target, started, tell)
        if not report.operations and not report.waited_for:
            tell(f"pending on {target.name}: {', '.join(pending)}")
        if not dry_run and needs_approval(actor, target, OperationKind.APPLY, {}):
            raise InvalidRequest(
                f"{target.name} requires approval by a second person for every change: an "
                "application cannot approve its own migrations; have them applied from the "
                f"console (ops up --target {target.name}) and approved there"
            )
        try:
            operation = _request_auto_attempt(
                actor, target, reason, dry_run, lock_timeout, attempt + 1, attempts
            )
        except OperationInProgress as busy:
            if time.monotonic() >= wait_deadline:
                last_error = str(busy)
                break
            tell(
                f"operation #{busy.operation_id} is in progress on {target.name}: waiting for it "
                f"(up to {lock_timeout} s)"
            )
            if busy.operation_id not in report.waited_for:
                report.waited_for.append(busy.operation_id)
            _wait_for(busy.operation_id, min(lock_timeout, wait_deadline - time.monotonic()))
            continue
        except ServiceError:
            if not _auto_pending(target):  # another migrator applied it meanwhile
                return _auto_up_to_date(report, target, started, tell)
            raise
        attempt += 1
        report.operations.append(operation.pk)
        operation = run_in_this_process(operation, worker="automigrate")
        if operation.status == OperationStatus.SUCCEEDED:
            return _auto_succeeded(report, operation, tell)
        last_error = operation.error or operation.status
        tell(f"attempt {attempt} of {attempts} failed: operation #{operation.pk}: {last_error}")
        if attempt < attempts:
            time.sleep(min(backoff_seconds * 2 ** (attempt - 1), AUTO_MIGRATE_MAX_BACKOFF_SECONDS))
    if not _auto_pending(target):
        return _auto_up_to_date(report, target, started, tell)
    report.outcome = AutoMigrateOutcome.FAILED
    what = "preview" if dry_run else "auto-migration"
    if report.operations:
        ours = ", ".join(f"#{pk}" for pk in report.operations)
        tell(f"{what} of {target.name} failed after {attempt} attempt(s) ({ours}): {last_error}")
    else:
        tell(f"{what} of {target.name} gave up waiting: {last_error}")
    return report


def _auto_pending(target: Target) -> list[str]:
    scripts = script_summaries(target)
    if not scripts:
        raise ServiceError(_no_scripts_hint(target))
    try:
        with _live_books(target) as books:
            return [s.filename for s in engine.plan.pending(books.applied, scripts)]
    except engine.EngineError as error:
        raise _plan_error(target, error) from None


def _request_auto_attempt(
    actor: Actor,
    target: Target,
    reason: str,
    dry_run: bool,
    lock_timeout: int,
    attempt: int,
    attempts: int,
) -> Operation:
    # One transaction, so the operation is sent (on commit) already carrying its lock
    # settings: one wait of the flags' lock timeout, retries being operations of their own.
    with transaction.atomic():
        operation = request_apply(
            actor=actor,
            target=target,
            reason=reason if attempts == 1 else f"{reason} (attempt {attempt} of {attempts})",
            dry_run=dry_run,
            confirm_name=target.name,
        )
        operation.params = {
            **operation.params,
            "lock_wait_seconds": lock_timeout,
            "lock_retries": 0,
            "auto_migrate": {"attempt": attempt, "attempts": attempts},
        }
        Operation.objects.filter(pk=operation.pk).update(params=operation.params)
    return operation


def run_in_this_process(operation: Operation, *, worker: str) -> Operation:
    """Run a queued operation in this process (the auto-migrator, a drill: both wait for their
    own operation); when a worker claimed it first (a broker is configured), wait for it.
    Without a broker the request's commit has run it here already: the claim then finds it
    taken and this only reads it back."""
    execute_operation(operation.pk, worker=f"{worker}@{socket.gethostname()}")
    _wait_for(operation.pk, settings.OPERATION_SOFT_TIME_LIMIT + 60)
    operation.refresh_from_db()
    return operation


def _wait_for(operation_id: int, seconds: float) -> None:
    deadline = time.monotonic() + max(0.0, seconds)
    query = Operation.objects.filter(pk=operation_id, status__in=ACTIVE_STATUSES)
    while query.exists() and time.monotonic() < deadline:
        time.sleep(AUTO_MIGRATE_POLL_SECONDS)


def _auto_up_to_date(report: AutoMigrateReport, target: Target, started, tell) -> AutoMigrateReport:
    report.outcome = AutoMigrateOutcome.UP_TO_DATE
    # The books can show another migrator's work a moment before its operation is recorded
    # as finished: name that operation once it is.
    by_another = (
        Operation.objects.filter(target=target, kind=OperationKind.APPLY)
        .filter(
            Q(status__in=ACTIVE_STATUSES)
            | Q(status=OperationStatus.SUCCEEDED, finished_at__gte=started)
        )
        .exclude(params__dry_run=True)
        .exclude(pk__in=report.operations)
        .order_by("-requested_at", "-id")
        .first()
    )
    if by_another is not None and not by_another.is_finished:
        _wait_for(by_another.pk, target.lock_timeout_seconds)
        by_another.refresh_from_db()
    if by_another is not None and by_another.status == OperationStatus.SUCCEEDED:
        tell(f"already applied by operation #{by_another.pk} ({by_another.requested_by_name})")
    else:
        tell(f"nothing to apply on {target.name}: every imported script is applied")
    return report


def _auto_succeeded(report: AutoMigrateReport, operation: Operation, tell) -> AutoMigrateReport:
    result = operation.result
    migrations = ", ".join(operation.params.get("migrations", []))
    if operation.params.get("dry_run"):
        report.outcome = AutoMigrateOutcome.PREVIEWED
        tell(f"dry run (operation #{operation.pk}): would apply {migrations}")
        for change in result.get("changes", []):
            tell(f"  {change['kind']}: {change['object']} ({change['detail']})")
        tell("dry run: rolled back, nothing was changed")
    else:
        report.outcome = AutoMigrateOutcome.APPLIED
        for entry in result.get("books", []):
            tell(f"  books: {entry}")
        tell(f"applied {migrations} (operation #{operation.pk})")
    return report


# --- API tokens --------------------------------------------------------------------------------
# Tokens read like "opc_<43 random characters>"; their first API_TOKEN_PREFIX_LENGTH characters
# name them in lists, logs and `ops token revoke` (the rest is never kept).
API_TOKEN_PREFIX = "opc_"  # noqa: S105 (not a secret: every token starts so)
API_TOKEN_PREFIX_LENGTH = 12


class ApiTokenNotFound(ServiceError):
    pass


def create_api_token(*, actor: Actor, name: str, targets) -> tuple[ApiToken, str]:
    """A new token for the application ``name``, reading only ``targets``. Returns the token
    row and the token itself, which exists nowhere else: show it once, then forget it."""
    require_permission(actor, "migrations_ops.add_apitoken", "create API tokens")
    name = (name or "").strip()
    if not name:
        raise InvalidRequest("an API token needs a name: the application that will use it")
    max_length = ApiToken._meta.get_field("name").max_length
    if len(name) > max_length:
        raise InvalidRequest(f"an API token's name has at most {max_length} characters")
    targets = list(targets)
    if not targets:
        raise InvalidRequest("an API token needs at least one target to read")
    for _attempt in range(3):  # prefixes are random: a clash is rare, and a new draw clears it
        raw = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
        try:
            with transaction.atomic():
                token = ApiToken.objects.create(
                    name=name,
                    prefix=raw[:API_TOKEN_PREFIX_LENGTH],
                    token_hash=hash_api_token(raw),
                    created_by=actor.user,
                    created_by_name=actor.name,
                )
                token.targets.set(targets)
                record_audit_event(
                    actor,
                    "api_token.created",
                    details={
                        "token": token.pk,
                        "name": name,
                        "prefix": token.prefix,
                        "targets": sorted(target.name for target in targets),
                    },
                )
        except IntegrityError:
            continue
        return token, raw
    raise ServiceError("could not draw an unused token prefix; try again")


def get_api_token(prefix: str) -> ApiToken:
    token = ApiToken.objects.filter(prefix=(prefix or "").strip()).first()
    if token is None:
        raise ApiTokenNotFound(f"no API token with prefix {prefix!r} (see: ops token list)")
    return token


def revoke_api_token(*, actor: Actor, token: ApiToken) -> ApiToken:
    """Revoke ``token`` for good: requests bearing it are refused from now on."""
    require_permission(actor, "migrations_ops.change_apitoken", "revoke API tokens")
    with transaction.atomic():
        locked = ApiToken.objects.select_for_update().filter(pk=token.pk).first()
        if locked is None:
            raise ApiTokenNotFound(f"API token {token.prefix} no longer exists")
        if locked.revoked_at is not None:
            raise InvalidRequest(
                f"API token {locked.prefix} ({locked.name}) was already revoked on "
                f"{locked.revoked_at:%Y-%m-%d %H:%M} UTC by {locked.revoked_by_name}"
            )
        locked.revoked_at = timezone.now()
        locked.revoked_by_name = actor.name
        locked.save(update_fields=["revoked_at", "revoked_by_name"])
        record_audit_event(
            actor,
            "api_token.revoked",
            details={"token": locked.pk, "name": locked.name, "prefix": locked.prefix},
        )
        # Forgotten now and again once committed: a request between the two may have cached
        # the token as still active.
        forget = partial(cache.delete, _token_cache_key(locked.token_hash))
        forget()
        transaction.on_commit(forget)
    token.revoked_at, token.revoked_by_name = locked.revoked_at, locked.revoked_by_name
    return token


def _token_cache_key(token_hash: str) -> str:
    return f"api-token:{token_hash}"


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """Who an API request is, as remembered: what the doors need of the token, and the targets
    version read along with it (see below; None without a shared cache)."""

    pk: int
    name: str
    prefix: str
    target_ids: frozenset[int]
    targets_version: int | None = None


def authenticate_api_token_cached(raw: str) -> TokenIdentity:
    """``authenticate_api_token``, remembered for API_TOKEN_CACHE_SECONDS (a revoke forgets it
    at once), so an application polling its flags costs no query to know who it is; with a
    shared cache the targets version comes in the same round trip. Without one (no Redis, or
    Redis unreachable) the token is read from the database: a revoke made by another process
    could not reach this process's memory."""
    if not _cache_is_shared():
        return _identity(authenticate_api_token(raw))
    key = _token_cache_key(hash_api_token(raw))
    found = cache.get_many([key, TARGETS_VERSION_KEY])
    if not _cache_is_shared():
        # Redis failed just now: what came back is this process's own memory.
        return _identity(authenticate_api_token(raw))
    known = found.get(key)
    if known is None:
        identity = _identity(authenticate_api_token(raw))  # raises InvalidToken
        known = (identity.pk, identity.name, identity.prefix, identity.target_ids)
        cache.set(key, known, settings.API_TOKEN_CACHE_SECONDS)
    return TokenIdentity(*known, targets_version=found.get(TARGETS_VERSION_KEY))


def _identity(token: ApiToken) -> TokenIdentity:
    return TokenIdentity(token.pk, token.name, token.prefix, token.target_ids)


# --- what the API serves from cache ------------------------------------------------------------
# Every target's save or delete (flag changes included: they save the target) sets a new
# "targets version" in the shared cache, at once and again once committed. What is derived
# from the targets' rows (the flags documents, the list of targets) is kept under the version
# it was read at, in the shared cache and in this process's memory, so a request costs one
# round trip to Redis (the token and the version together) and a change is seen from the next
# request on. With a cache of this process only (no CACHE_URL, or its Redis unreachable: see
# opsconsole/cache.py) another process's change would not reach it: there the rows are read
# from the database instead (a flags document is keyed by the row's updated_at, a token read
# on each request).
TARGETS_VERSION_KEY = "targets-version"


def _cache_is_shared() -> bool:
    """Whether the cache is Redis, and reachable as far as this process knows."""
    backend = settings.CACHES["default"]["BACKEND"]
    return not backend.endswith("LocMemCache") and not getattr(cache, "degraded", False)


@receiver(cache_reconnected, dispatch_uid="api_caches_after_outage")
def _forget_what_the_outage_left_stale(sender, **kwargs) -> None:
    """Redis answers again after this process could not reach it: changes made meanwhile (by
    any process) did not reach it. A new targets version stops whatever was kept under the old
    one from being served, and the tokens revoked lately are forgotten (one remembered as
    active before its revoke would otherwise be accepted until its entry expires)."""
    cache.set(TARGETS_VERSION_KEY, time.time_ns(), None)
    # An entry is made at the latest just after its token's revoke, and lives at most
    # API_TOKEN_CACHE_SECONDS: only tokens revoked since then can have one left (a minute more
    # for the clocks of the hosts that revoked).
    since = timezone.now() - dt.timedelta(seconds=settings.API_TOKEN_CACHE_SECONDS + 60)
    revoked = ApiToken.objects.filter(revoked_at__gte=since).values_list("token_hash", flat=True)
    cache.delete_many([_token_cache_key(token_hash) for token_hash in revoked])


@receiver(post_save, sender=Target, dispatch_uid="api_caches_target_saved")
@receiver(post_delete, sender=Target, dispatch_uid="api_caches_target_deleted")
def _target_changed(sender, instance: Target, **kwargs) -> None:
    flags_changed(instance)


def flags_changed(target: Target | None = None) -> None:
    """Let the API serve ``target``'s new flags (and name, stage...) from the next request on:
    called for every save or delete of a target (the signal above)."""
    if not _cache_is_shared():
        return
    # Now and again once committed: a request between the two may have cached the old row.
    cache.set(TARGETS_VERSION_KEY, time.time_ns(), None)
    transaction.on_commit(lambda: cache.set(TARGETS_VERSION_KEY, time.time_ns(), None))


def targets_version(known: int | None = None) -> int:
    """The current targets version (``known``: as already read with the token)."""
    if known is not None:
        return known
    version = cache.get(TARGETS_VERSION_KEY)
    if version is None:
        cache.add(TARGETS_VERSION_KEY, time.time_ns(), None)
        version = cache.get(TARGETS_VERSION_KEY)
    return version


class _ProcessMemory:
    """Values derived from one targets version, kept in this process until the version
    changes (a dict per version: reads and writes of a dict are atomic for threads)."""

    def __init__(self) -> None:
        # One tuple, replaced whole: a thread never sees a new version with the old values.
        self.current: tuple = (None, {})

    def get(self, version, key):
        current_version, values = self.current
        return values.get(key) if version == current_version else None

    def set(self, version, key, value) -> None:
        current_version, values = self.current
        if version != current_version:
            values = {}
            self.current = (version, values)
        values[key] = value


_flags_memory = _ProcessMemory()
_targets_memory = _ProcessMemory()


@dataclass(frozen=True)
class FlagsDocument:
    """``GET /api/targets/<name>/flags`` as served: the JSON body, its ETag and how long an
    application may keep it (MIGRATION_CACHE_TTL)."""

    target_id: int
    body: bytes
    etag: str
    max_age: int


def flags_document(name: str, *, version: int | None = None) -> FlagsDocument:
    """The flags an application's auto-migrator obeys, with the target's name, its re-enable
    stage and when a flag last changed. TargetNotFound for an unknown name. ``version``: the
    targets version if already read (``authenticate_api_token_cached``)."""
    if not _cache_is_shared():
        updated_at = Target.objects.filter(name=name).values_list("updated_at", flat=True).first()
        if updated_at is None:
            raise TargetNotFound(f"unknown target {name!r}")
        key = f"flags:{updated_at.timestamp()}:{name}"
        document = cache.get(key)
        if document is None:
            document = _build_flags_document(get_target(name))
            cache.set(key, document, 3600)
        return document
    version = targets_version(version)
    document = _flags_memory.get(version, name)
    if document is None:
        key = f"flags:{version}:{name}"
        document = cache.get(key)
        if document is None:
            document = _build_flags_document(get_target(name))
            cache.set(key, document, 3600)
        _flags_memory.set(version, name, document)
    return document


def _build_flags_document(target: Target) -> FlagsDocument:
    last_change = target.flag_changes.order_by("-changed_at", "-id").first()
    body = json.dumps(
        {
            "target": target.name,
            "flags": selectors.flags_of(target),
            "stage": target.flag_stage,
            "changed_at": last_change.changed_at.isoformat() if last_change else None,
            "change_reason": last_change.reason if last_change else None,
        },
        sort_keys=True,
    ).encode()
    # A strong validator: the same bytes always give the same tag, any change a new one.
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return FlagsDocument(target.pk, body, etag, target.cache_ttl_seconds)


def target_ids_by_name(*, only=None, version: int | None = None) -> list[int]:
    """Every target's id in the order of their names (``only``: those among these ids)."""
    if _cache_is_shared():
        version = targets_version(version)
        ids = _targets_memory.get(version, "ids")
        if ids is None:
            ids = list(Target.objects.order_by("name").values_list("pk", flat=True))
            _targets_memory.set(version, "ids", ids)
    else:
        ids = list(Target.objects.order_by("name").values_list("pk", flat=True))
    return ids if only is None else [pk for pk in ids if pk in only]


# A target's status as the API reports it, kept for STATUS_MAX_AGE seconds: a monitor polling
# the status of 50 targets must not cost 50 connections a request. Kept in the shared cache and
# in this process's memory; each reading carries when it was made, so wherever it comes from
# its age is known and told. The shared entry outlives STATUS_MAX_AGE so that, while one
# request reads a target again, the others serve the reading before (with its age).
_status_memory: dict[int, dict] = {}


def _status_key(target_id: int) -> str:
    return f"status:{target_id}"


# Held by the request reading stale targets again.
STATUS_READING_KEY = "status-reading"


def target_status_reports(target_ids, *, live: bool = False) -> list[dict]:
    """The status report (selectors.status_report) of each target in ``target_ids``, from a
    reading at most STATUS_MAX_AGE seconds old, else read live now (all live with ``live``);
    each with ``read_at`` and ``reading_age_seconds``. In the order of ``target_ids``."""
    now, entries = _status_entries(target_ids, live=live)
    return [
        entry["report"]
        | {
            "read_at": entry["read_at_text"],
            "reading_age_seconds": round(max(now - entry["read_at"], 0.0), 1),
        }
        for entry in entries
    ]


def target_status_json(target_ids, *, live: bool = False) -> str:
    """``target_status_reports`` as a JSON array, put together from each reading's JSON as it
    was encoded when read (encoding 50 reports on every request would cost more than all else
    the request does)."""
    now, entries = _status_entries(target_ids, live=live)
    return (
        "["
        + ",".join(
            f'{entry["json"][:-1]},"read_at":"{entry["read_at_text"]}",'
            f'"reading_age_seconds":{round(max(now - entry["read_at"], 0.0), 1)}}}'
            for entry in entries
        )
        + "]"
    )


# How long this process serves a reading it found old while another request reads it again,
# before asking the shared cache whether the new one is there (not on every request).
STATUS_RECHECK_SECONDS = 0.25
_status_recheck_after: dict[int, float] = {}


def _status_entries(target_ids, *, live: bool) -> tuple[float, list[dict]]:
    target_ids = list(target_ids)
    max_age = settings.STATUS_MAX_AGE
    now = time.time()
    readings, missing = {}, []
    for pk in target_ids:
        entry = None if live else _status_memory.get(pk)
        if entry is not None and (
            now - entry["read_at"] <= max_age or now < _status_recheck_after.get(pk, 0)
        ):
            readings[pk] = entry
        else:
            missing.append(pk)
    if missing:
        readings |= _shared_or_live_readings(missing, live=live, now=now)
    # A target deleted while being read has no reading: it is left out.
    return time.time(), [readings[pk] for pk in target_ids if pk in readings]


def _shared_or_live_readings(target_ids: list[int], *, live: bool, now: float) -> dict:
    max_age = settings.STATUS_MAX_AGE
    cached = {} if live else cache.get_many([_status_key(pk) for pk in target_ids])
    readings, stale, unread = {}, {}, []
    for pk in target_ids:
        entry = cached.get(_status_key(pk))
        if entry is not None and now - entry["read_at"] <= max_age:
            readings[pk] = entry
        elif entry is None:
            unread.append(pk)
        else:
            stale[pk] = entry
    # Stale readings are read again by one request at a time (the others serve them meanwhile,
    # with their age): in a thread of its own when STATUS_READ_AGAIN_IN_BACKGROUND (this
    # request too answers with them, and no request waits for 50 targets), else before it
    # answers. A target never read, or ?live=1, is read by whoever asks, before answering.
    if stale and not cache.add(STATUS_READING_KEY, 1, _reading_lock_seconds()):
        _serve_meanwhile(stale, readings, now)
        stale = {}
    if stale and settings.STATUS_READ_AGAIN_IN_BACKGROUND:
        # Those half-way to stale too: the targets then age together, read in one batch.
        again = [*stale, *(pk for pk, e in readings.items() if now - e["read_at"] > max_age / 2)]
        _serve_meanwhile(stale, readings, now)
        threading.Thread(target=_read_again_in_background, args=(again,), daemon=True).start()
        stale = {}
    try:
        if stale or unread:
            readings |= _read_statuses([*stale, *unread])
    finally:
        if stale:
            cache.delete(STATUS_READING_KEY)
    _status_memory.update(readings)
    return readings


def _serve_meanwhile(stale: dict, readings: dict, now: float) -> None:
    readings |= stale
    for pk in stale:
        _status_recheck_after[pk] = now + STATUS_RECHECK_SECONDS


def _read_again_in_background(target_ids: list[int]) -> None:
    from django.db import connections

    try:
        # Spread over up to a quarter of STATUS_MAX_AGE: 50 connections opened at once would
        # take the CPU from the requests being answered meanwhile.
        pause = min(0.02, settings.STATUS_MAX_AGE / 4 / max(len(target_ids), 1))
        _status_memory.update(_read_statuses(target_ids, pause=pause))
    except Exception:
        logger.exception("could not read the status of targets %s again", target_ids)
    finally:
        cache.delete(STATUS_READING_KEY)
        connections.close_all()  # this thread's own connections to the console's database


def observe_targets() -> int:
    """Read every target's lock and books now (as the status endpoint would), so what the
    console shows stays current even when nobody asks; returns how many were read."""
    return len(_read_statuses(list(Target.objects.values_list("pk", flat=True))))


def _reading_lock_seconds() -> int:
    return settings.TARGET_CONNECT_TIMEOUT + settings.TARGET_STATEMENT_TIMEOUT + 5


def _read_statuses(target_ids: list[int], *, pause: float = 0) -> dict[int, dict]:
    readings = []
    for target in selectors.targets_with_observations().filter(pk__in=target_ids):
        if pause and readings:
            time.sleep(pause)
        readings.append((target, *_read_live(target), time.time()))
    observe_locks([(target, lock, error or "") for target, lock, _, error, _ in readings])
    entries = {}
    for target, _, applied, error, read_at in readings:
        report = selectors.status_report(target, applied, error)
        entries[target.pk] = {
            "read_at": read_at,
            "read_at_text": dt.datetime.fromtimestamp(read_at, dt.UTC).isoformat(),
            "report": report,
            "json": json.dumps(report, cls=DjangoJSONEncoder),  # as JsonResponse encodes
        }
    keep = max(settings.STATUS_MAX_AGE * 12, 60)
    cache.set_many({_status_key(pk): entry for pk, entry in entries.items()}, keep)
    return entries
