"""Reading a target live, and recording what was read as its lock observation.

Process state owned here: ``_kept_target_connections``, the target connections this
process keeps open between uses (a pool; benches and tests clear it).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, transaction
from django.db.models import Case, DateTimeField, F, Value, When
from django.utils import timezone

from migrations_ops import engine, plain_rows, selectors
from migrations_ops.models import LockObservation, Target


@dataclass
class TargetStatus:
    """What a live read of a target found; ``error`` is set when it could not be read."""

    target: Target
    observation: LockObservation
    applied: list[engine.AppliedMigration] | None
    error: str | None


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
