"""Tamper evidence for the audit trail: a hash chain over audit events in id order.

Each event's ``hash`` is ``HMAC-SHA-256(AUDIT_CHAIN_KEY, previous_hash + canonical JSON of
its content)``, and its ``previous_hash`` is the hash of the event before it (``""`` for the
first). Changing a row breaks its own hash; rewriting its hash too, removing a row or slipping
one in breaks the link of the row after it. The key lives in the console's environment, not in
its database: whoever can write to the database cannot compute the hashes a rewritten chain
would need. ``ops audit-verify`` walks the chain (``walk``).

Appending must never fork the chain, so appends are serialised and the chain follows commit
order: on PostgreSQL a transaction-scoped advisory lock, held until the caller's transaction
commits, then a read of the last hash (one round trip: ``chain_head``); on SQLite the
database's single write lock, taken before the read. Whoever holds the chain lock must lock
nothing after it (it is the last lock of a transaction), or two transactions could wait for
each other: write the audit event last.

What the chain cannot tell by itself: rows removed from its end, or all of them. After each
append commits, its head is written outside the database (``audit_witness``, moved by
``services.audit``, the one way events are appended), and ``ops audit-verify`` checks the chain
still passes through it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, router, transaction

from migrations_ops import plain_rows

GENESIS = ""
# pg_advisory_xact_lock's key for appending to the chain (any constant no other code uses).
CHAIN_LOCK_KEY = 7_305_011_590_221_457
# On PostgreSQL, the lock and the read of the last hash in one round trip (migration 0011).
CHAIN_HEAD_FUNCTION = "opsconsole_audit_chain_head"

# The content a hash covers, by attribute name. Changing this list changes every hash: the
# chain of rows already written would no longer verify.
CHAINED_FIELDS = (
    "created_at",
    "actor_id",
    "actor_name",
    "door",
    "action",
    "target_id",
    "target_name",
    "operation_id",
    "details",
    "ip",
    "request_id",
    "object_model",
    "object_id",
    "before",
    "after",
)


def _canonical(value):
    """JSON values as the database gives them back: PostgreSQL's jsonb keeps ``1e20`` as
    ``100000000000000000000``, so integral floats count as integers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(key): _canonical(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    return value


def content_of(event) -> dict:
    content = {name: getattr(event, name) for name in CHAINED_FIELDS}
    created_at = content["created_at"]
    if isinstance(created_at, dt.datetime):
        content["created_at"] = created_at.astimezone(dt.UTC).isoformat()
    return content


def compute_hash(previous_hash: str, content: dict) -> str:
    text = json.dumps(
        _canonical(content), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hmac.new(chain_key(), (previous_hash + text).encode(), hashlib.sha256).hexdigest()


def chain_key() -> bytes:
    if not settings.AUDIT_CHAIN_KEY:
        raise ImproperlyConfigured(
            "AUDIT_CHAIN_KEY is not set: it keys the audit trail's hash chain "
            '(python -c "import secrets; print(secrets.token_urlsafe(48))")'
        )
    return settings.AUDIT_CHAIN_KEY.encode()


def seal(event, previous_hash: str) -> str:
    """Link ``event`` to ``previous_hash``; returns its own hash."""
    event.previous_hash = previous_hash
    event.hash = compute_hash(previous_hash, content_of(event))
    return event.hash


def chain_head(model, using: str) -> str:
    """Take the chain's lock until the current transaction ends (one must be open), then
    read the last hash. PostgreSQL: one call of the function migration 0011 made. SQLite: a
    write that changes nothing takes the database's write lock first, so no other writer can
    append after the hash read here before this transaction commits."""
    connection = connections[using]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {CHAIN_HEAD_FUNCTION}()")
            return cursor.fetchone()[0]
    with connection.cursor() as cursor:
        table = connection.ops.quote_name(model._meta.db_table)
        cursor.execute(f"UPDATE {table} SET id = id WHERE 0")  # noqa: S608 (the model's table)
    found = model._base_manager.using(using).order_by("-id").values_list("hash", flat=True)
    return found.first() or GENESIS


def append(event):
    """Seal and insert one event, in the caller's transaction (or a new one)."""
    using = router.db_for_write(type(event))
    with transaction.atomic(using=using, savepoint=False):
        seal(event, chain_head(type(event), using))
        # Every operation writes two events: plain SQL spares the ORM's insert machinery.
        plain_rows.insert(event, using=using)
    return event


def append_many(model, events: list, *, batch_size: int = 2000) -> list:
    """Seal and insert many events in one transaction, chained in list order."""
    using = router.db_for_write(model)
    with transaction.atomic(using=using, savepoint=False):
        previous = chain_head(model, using)
        for event in events:
            previous = seal(event, previous)
        # One statement per batch: ids are handed out in the order of the rows.
        return model._base_manager.using(using).bulk_create(events, batch_size=batch_size)


# --- verifying --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChainProblem:
    event_id: int
    kind: str  # "altered", "inserted", "removed"; from the witness "unwitnessed", "witness damaged"
    message: str


@dataclass
class ChainReport:
    count: int = 0
    last_id: int | None = None
    last_hash: str = GENESIS


def walk(events: Iterable, report: ChainReport | None = None) -> Iterator[ChainProblem]:
    """The chain's problems, in id order, from ``events`` given in id order (model instances
    or anything with their attributes). ``report`` is filled in as the walk goes.

    A row whose link breaks is judged with the row after it: if that one links to the row
    before, the row was slipped in; otherwise rows were removed in between (or the row before
    was rewritten, hash included)."""
    report = report if report is not None else ChainReport()
    before_previous = previous = None
    suspect = None  # (row whose link broke, the row before it), judged by the next row
    for row in events:
        report.count += 1
        report.last_id, report.last_hash = row.id, row.hash
        if compute_hash(row.previous_hash, content_of(row)) != row.hash:
            yield ChainProblem(
                row.id,
                "altered",
                f"audit event #{row.id} was altered: its hash does not match its content",
            )
        if suspect is not None:
            broken, before = suspect
            suspect = None
            if row.previous_hash == before.hash:
                yield _inserted(broken, row, before)
                before_previous, previous = broken, row
                continue
            yield _removed(broken, before)
        expected = previous.hash if previous is not None else GENESIS
        if row.previous_hash != expected:
            if before_previous is not None and row.previous_hash == before_previous.hash:
                yield _inserted(previous, row, before_previous)
            elif previous is None:
                yield ChainProblem(
                    row.id,
                    "removed",
                    f"audit events were removed before #{row.id}, the "
                    "first: it links to an event that is not there",
                )
            else:
                suspect = (row, previous)
        before_previous, previous = previous, row
    if suspect is not None:
        yield _removed(*suspect)


def _inserted(inserted, after, before) -> ChainProblem:
    return ChainProblem(
        inserted.id,
        "inserted",
        f"audit event #{inserted.id} was inserted: #{after.id} links to #{before.id}, the event "
        "before it",
    )


def _removed(row, before) -> ChainProblem:
    return ChainProblem(
        row.id,
        "removed",
        f"audit events were removed between #{before.id} and #{row.id} (or #{before.id} was "
        f"rewritten with a new hash): #{row.id} does not link to #{before.id}",
    )
