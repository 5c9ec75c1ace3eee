"""Conventions: how a migration tool keeps its books inside a target.

A convention knows the tables of one tool and how to read its applied migrations, read its
lock and release it. Lock rows are returned as plain JSON-ready dicts, column by column as the
table has them, so the console can show and record them without knowing every tool's columns.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import psycopg

from .connection import TargetConnection
from .errors import EngineError, LockChanged, LockNotHeld

UTC = dt.UTC


@dataclass(frozen=True)
class LockState:
    """The migration lock as read from the target."""

    held: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    # When the target itself says the lock was taken; None when its table keeps no time.
    locked_at: dt.datetime | None = None
    holder: str | None = None
    # The lock table's columns as the read found them (not part of what was seen).
    columns: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "held": self.held,
            "rows": self.rows,
            "locked_at": self.locked_at.isoformat() if self.locked_at else None,
            "holder": self.holder,
        }


@dataclass(frozen=True)
class AppliedMigration:
    name: str
    applied_at: dt.datetime | None
    batch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "applied_at": self.applied_at.isoformat() if self.applied_at else None,
            "batch": self.batch,
        }


def jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return to_utc(value).isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    return value


def to_utc(value: dt.datetime) -> dt.datetime:
    """Naive timestamps in migration tables are UTC by the tools' own convention."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_timestamp(value: Any) -> dt.datetime | None:
    """A timestamp as tools store it: a datetime, ISO text (SQLite), or epoch seconds / ms."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return to_utc(value)
    if isinstance(value, int | float | decimal.Decimal) and not isinstance(value, bool):
        seconds = float(value)
        if seconds > 1e11:  # JavaScript's Date.now() counts milliseconds
            seconds /= 1000
        return dt.datetime.fromtimestamp(seconds, UTC)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return parse_timestamp(int(text))
        try:
            return to_utc(dt.datetime.fromisoformat(text.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


class Convention:
    """One tool's bookkeeping. Subclasses name their tables and say what "held" means."""

    name: ClassVar[str]
    label: ClassVar[str]
    migrations_table: ClassVar[str]
    lock_table: ClassVar[str]

    def require_tables(self, connection: TargetConnection) -> None:
        connection.require_tables(self.name, self.migrations_table, self.lock_table)

    def _fetch(
        self, connection: TargetConnection, query: str, *, check_tables: bool
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """``query`` over the convention's tables; ``check_tables``: that both exist."""
        if not check_tables:
            return connection.fetch_table(query)
        tables = (self.migrations_table, self.lock_table)
        (result,) = connection.fetch_checked(self.name, tables, [query])
        return result

    # --- reading -------------------------------------------------------------------------------
    def read_lock(
        self, connection: TargetConnection, *, for_update: bool = False, check_tables: bool = True
    ) -> LockState:
        query = self._lock_query(connection, for_update=for_update)
        return self._lock_state(*self._fetch(connection, query, check_tables=check_tables))

    def _lock_state(self, columns: list[str], found: list[dict[str, Any]]) -> LockState:
        """The lock as the lock table's rows (``found``, with its ``columns``) show it."""
        rows = [{k: jsonable(v) for k, v in row.items()} for row in found]
        held_rows = [row for row in rows if self.row_holds_lock(row)]
        if not held_rows:
            return LockState(held=False, rows=rows, columns=tuple(columns))
        locked_at = self.locked_at(held_rows[0])
        return LockState(
            held=True,
            rows=rows,
            locked_at=locked_at,
            holder=self.holder(held_rows[0]),
            columns=tuple(columns),
        )

    def read_applied(
        self, connection: TargetConnection, *, check_tables: bool = True
    ) -> list[AppliedMigration]:
        query = self._applied_query(connection)
        return self._applied_from(self._fetch(connection, query, check_tables=check_tables)[1])

    def read(self, connection: TargetConnection) -> tuple[LockState, list[AppliedMigration]]:
        """The lock and the books, as one read: in one round trip where the target allows."""
        (columns, found), (_, applied) = connection.fetch_checked(
            self.name,
            (self.migrations_table, self.lock_table),
            [self._lock_query(connection), self._applied_query(connection)],
        )
        return self._lock_state(columns, found), self._applied_from(applied)

    def _lock_query(self, connection: TargetConnection, *, for_update: bool = False) -> str:
        query = f"SELECT * FROM {connection.quote(self.lock_table)}"  # noqa: S608 (quoted)
        if for_update and connection.dialect == "postgresql":
            query += " FOR UPDATE"
        return query

    def _applied_query(self, connection: TargetConnection) -> str:
        """The books' rows, in the order they were applied."""
        raise NotImplementedError

    def _applied_from(self, rows: list[dict[str, Any]]) -> list[AppliedMigration]:
        raise NotImplementedError

    def row_holds_lock(self, row: dict[str, Any]) -> bool:
        raise NotImplementedError

    def locked_at(self, row: dict[str, Any]) -> dt.datetime | None:
        return None

    def holder(self, row: dict[str, Any]) -> str | None:
        return None

    # --- writing -------------------------------------------------------------------------------
    def release_lock(
        self, connection: TargetConnection, *, expected_rows: list[dict[str, Any]] | None = None
    ) -> tuple[LockState, LockState]:
        """Release the lock in one transaction; return it as it was before and as it is after.

        With ``expected_rows`` (the lock the operator saw when asking), a lock that has since
        been released or re-taken by someone else is left alone and ``LockChanged`` is raised.
        """
        with connection.transaction():
            before = self.read_lock(connection, for_update=True)
            if not before.held:
                raise LockNotHeld("the migration lock is not held: there is nothing to release")
            if expected_rows is not None and before.rows != expected_rows:
                raise LockChanged(
                    "the migration lock changed since the release was requested "
                    f"(now: {describe_rows(before.rows)}); look at it again and re-request"
                )
            self._release(connection)
            # The tables were checked by the first read, in this same transaction.
            after = self.read_lock(connection, check_tables=False)
            if after.held:
                raise EngineError("the migration lock was still held after the release")
        return before, after

    def _release(self, connection: TargetConnection) -> None:
        raise NotImplementedError

    # --- migrating: take the lock, keep the books ------------------------------------------------
    def try_take_lock(
        self,
        connection: TargetConnection,
        holder: str,
        *,
        when_held: Callable[[LockState], None] | None = None,
    ) -> bool:
        """One attempt to take the lock, committed at once so other migrators see it.
        ``when_held`` is shown the lock if it is held, and may raise to give up."""
        if connection.dialect == "postgresql":
            return self._try_take_lock_postgresql(connection, holder, when_held)
        with connection.transaction():  # BEGIN IMMEDIATE: SQLite's one writer at a time
            self.require_tables(connection)
            lock = self.read_lock(connection, check_tables=False)
            if lock.held:
                if when_held is not None:
                    when_held(lock)
                return False
            for query, params in self._take(connection, holder, lock):
                connection.execute(query, params)
        return True

    def _try_take_lock_postgresql(
        self,
        connection: TargetConnection,
        holder: str,
        when_held: Callable[[LockState], None] | None,
    ) -> bool:
        """``try_take_lock`` in two round trips (five, statement by statement): the lock read
        under an advisory lock, then the lock written with the commit."""
        key = f"opsconsole:{connection.schema or ''}:{self.lock_table}"
        tables = (self.migrations_table, self.lock_table)
        read = connection.checked(tables, self._lock_query(connection, for_update=True))
        try:
            *_, (columns, rows) = connection.run_together(
                [
                    ("BEGIN", ()),
                    # Serialises the console's takers even where the lock table has no unique
                    # key; the read after it has a snapshot of its own, so it sees the lock
                    # the taker before committed.
                    ("SELECT pg_advisory_xact_lock(hashtext(%s))", (key,)),
                    (read, ()),
                ]
            )
            lock = self._lock_state(columns, rows)
            if lock.held:
                connection.roll_back()
                if when_held is not None:
                    when_held(lock)
                return False
            connection.run_together([*self._take(connection, holder, lock), ("COMMIT", ())])
        except psycopg.errors.UndefinedTable:
            connection.roll_back()
            self.require_tables(connection)  # says which table is missing
            raise
        except BaseException:
            connection.roll_back()
            raise
        return True

    def _take(
        self, connection: TargetConnection, holder: str, lock: LockState
    ) -> list[tuple[str, list[Any]]]:
        """The statements that write the lock as taken by ``holder``; ``lock``: as just
        read, free, in the same transaction."""
        raise NotImplementedError

    def release_own_lock(self, connection: TargetConnection, holder: str) -> LockState:
        """Release the lock ``holder`` took; return the lock as it is after."""
        raise NotImplementedError

    def record_applied(
        self, connection: TargetConnection, name: str, batch: int, applied_at: dt.datetime
    ) -> None:
        raise NotImplementedError

    def remove_applied(self, connection: TargetConnection, name: str) -> int:
        raise NotImplementedError

    def next_batch(self, connection: TargetConnection) -> int:
        return 1

    def repair_lock_table(
        self,
        connection: TargetConnection,
        *,
        release: bool,
        expected_rows: list[dict[str, Any]] | None = None,
    ) -> list[str]:
        """The runbook's ``migrate:cleanup``: make the lock table well-formed and, when
        ``release`` (the caller found the lock stale), free it — only if it is still
        ``expected_rows``, the lock the caller judged. Returns what it changed."""
        raise NotImplementedError


def _still_the_lock_judged_stale(
    rows: list[dict[str, Any]],
    release: bool,
    expected_rows: list[dict[str, Any]] | None,
    changes: list[str],
) -> bool:
    """A lock re-taken since it was judged stale belongs to a live holder: never release it."""
    if release and expected_rows is not None and rows != expected_rows:
        changes.append("the lock changed since it was found stale: left alone")
        return False
    return release


def describe_rows(rows: list[dict[str, Any]]) -> str:
    return "; ".join(", ".join(f"{k}={v}" for k, v in row.items()) for row in rows) or "no rows"


class RunbookConvention(Convention):
    """The runbook's own books: ``migrations(filename, applied_at)`` and
    ``migration_lock(id = 1, locked_at, locked_by)``; the lock is held while a row exists."""

    name = "runbook"
    label = "Runbook (migrations + migration_lock)"
    migrations_table = "migrations"
    lock_table = "migration_lock"

    def _applied_query(self, connection: TargetConnection) -> str:
        table = connection.quote(self.migrations_table)
        return f"SELECT filename, applied_at FROM {table} ORDER BY applied_at, filename"  # noqa: S608

    def _applied_from(self, rows: list[dict[str, Any]]) -> list[AppliedMigration]:
        return [
            AppliedMigration(str(r["filename"]), parse_timestamp(r["applied_at"])) for r in rows
        ]

    def row_holds_lock(self, row: dict[str, Any]) -> bool:
        return True

    def locked_at(self, row: dict[str, Any]) -> dt.datetime | None:
        return parse_timestamp(row.get("locked_at"))

    def holder(self, row: dict[str, Any]) -> str | None:
        value = row.get("locked_by")
        return None if value is None else str(value)

    def _release(self, connection: TargetConnection) -> None:
        # The runbook's Scenario 3: "DELETE FROM migration_lock" releases every lock row.
        connection.execute(f"DELETE FROM {connection.quote(self.lock_table)}")  # noqa: S608

    def _take(
        self, connection: TargetConnection, holder: str, lock: LockState
    ) -> list[tuple[str, list[Any]]]:
        present = set(lock.columns)  # the lock row was read with them, in this transaction
        values: dict[str, Any] = {"id": 1}
        if "locked_at" in present:
            values["locked_at"] = connection.timestamp(dt.datetime.now(UTC))
        if "locked_by" in present:
            values["locked_by"] = holder
        columns = ", ".join(connection.quote(column) for column in values)
        marks = ", ".join([connection.placeholder] * len(values))
        table = connection.quote(self.lock_table)
        insert = f"INSERT INTO {table} ({columns}) VALUES ({marks})"  # noqa: S608
        return [(insert, list(values.values()))]

    def release_own_lock(self, connection: TargetConnection, holder: str) -> LockState:
        table = connection.quote(self.lock_table)
        if connection.dialect == "postgresql":
            # One round trip, whatever the migration just run did to the table: the holder's
            # rows where the table keeps a holder, else every row (as below). The SELECT sees
            # the table as the DELETE found it, so the rows it keeps are those left after.
            ours = "NOT to_jsonb(lock_row) ? 'locked_by' OR to_jsonb(lock_row) ->> 'locked_by' = %s"
            return self._lock_state(
                *connection.fetch_table(
                    f"WITH released AS (DELETE FROM {table} AS lock_row WHERE {ours}) "  # noqa: S608
                    f"SELECT * FROM {table} AS lock_row WHERE NOT ({ours})",
                    [holder, holder],
                )
            )
        if "locked_by" in connection.columns(self.lock_table):
            connection.execute(
                f"DELETE FROM {table} WHERE locked_by = {connection.placeholder}",  # noqa: S608
                [holder],
            )
        else:
            connection.execute(f"DELETE FROM {table}")  # noqa: S608
        return self.read_lock(connection, check_tables=False)

    def record_applied(
        self, connection: TargetConnection, name: str, batch: int, applied_at: dt.datetime
    ) -> None:
        mark = connection.placeholder
        connection.execute(
            f"INSERT INTO {connection.quote(self.migrations_table)} (filename, applied_at) "  # noqa: S608
            f"VALUES ({mark}, {mark})",
            [name, connection.timestamp(applied_at)],
        )

    def remove_applied(self, connection: TargetConnection, name: str) -> int:
        return connection.execute(
            f"DELETE FROM {connection.quote(self.migrations_table)} "  # noqa: S608
            f"WHERE filename = {connection.placeholder}",
            [name],
        )

    def repair_lock_table(
        self,
        connection: TargetConnection,
        *,
        release: bool,
        expected_rows: list[dict[str, Any]] | None = None,
    ) -> list[str]:
        table = connection.quote(self.lock_table)
        changes = []
        with connection.transaction():
            rows = self.read_lock(connection, for_update=True).rows
            release = _still_the_lock_judged_stale(rows, release, expected_rows, changes)
            extra = [row for row in rows if row.get("id") != 1]
            # Every row holds the lock: without ``release``, extra rows go only while the id 1
            # row keeps it held, so that tidying never frees a lock that is not stale.
            if extra and (release or len(rows) > len(extra)):
                connection.execute(
                    f"DELETE FROM {table} WHERE id IS NULL OR id <> 1"  # noqa: S608
                )
                changes.append(f"removed {len(extra)} extra lock row(s): {describe_rows(extra)}")
            if release and len(rows) > len(extra):
                connection.execute(f"DELETE FROM {table}")  # noqa: S608
                kept = [row for row in rows if row.get("id") == 1]
                changes.append(f"removed the stale lock row: {describe_rows(kept)}")
        return changes


class KnexConvention(Convention):
    """Knex: ``knex_migrations(id, name, batch, migration_time)`` and
    ``knex_migrations_lock(index, is_locked)``; held while ``is_locked = 1``. The lock row keeps
    no time and no holder, which is why the console remembers when it first saw it held."""

    name = "knex"
    label = "Knex (knex_migrations + knex_migrations_lock)"
    migrations_table = "knex_migrations"
    lock_table = "knex_migrations_lock"

    def _applied_query(self, connection: TargetConnection) -> str:
        table = connection.quote(self.migrations_table)
        return f"SELECT id, name, batch, migration_time FROM {table} ORDER BY id"  # noqa: S608

    def _applied_from(self, rows: list[dict[str, Any]]) -> list[AppliedMigration]:
        return [
            AppliedMigration(
                str(r["name"]),
                parse_timestamp(r["migration_time"]),
                None if r["batch"] is None else int(r["batch"]),
            )
            for r in rows
        ]

    def row_holds_lock(self, row: dict[str, Any]) -> bool:
        value = row.get("is_locked")
        return value not in (None, 0, False, "0", "false")

    def _release(self, connection: TargetConnection) -> None:
        # What `knex migrate:unlock` does.
        connection.execute(
            f"UPDATE {connection.quote(self.lock_table)} SET is_locked = 0"  # noqa: S608
        )

    def _take(
        self, connection: TargetConnection, holder: str, lock: LockState
    ) -> list[tuple[str, list[Any]]]:
        # Knex keeps one lock row: a missing one is inserted taken.
        table = connection.quote(self.lock_table)
        missing = f"SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM {table})"  # noqa: S608
        return [
            (f"UPDATE {table} SET is_locked = 1", []),  # noqa: S608
            (f"INSERT INTO {table} (is_locked) {missing}", []),
        ]

    def release_own_lock(self, connection: TargetConnection, holder: str) -> LockState:
        if connection.dialect == "postgresql":  # every row, as it is after: one round trip
            table = connection.quote(self.lock_table)
            return self._lock_state(
                *connection.fetch_table(f"UPDATE {table} SET is_locked = 0 RETURNING *")  # noqa: S608
            )
        self._release(connection)
        return self.read_lock(connection, check_tables=False)

    def record_applied(
        self, connection: TargetConnection, name: str, batch: int, applied_at: dt.datetime
    ) -> None:
        mark = connection.placeholder
        connection.execute(
            f"INSERT INTO {connection.quote(self.migrations_table)} "  # noqa: S608
            f"(name, batch, migration_time) VALUES ({mark}, {mark}, {mark})",
            [name, batch, connection.timestamp(applied_at)],
        )

    def remove_applied(self, connection: TargetConnection, name: str) -> int:
        return connection.execute(
            f"DELETE FROM {connection.quote(self.migrations_table)} "  # noqa: S608
            f"WHERE name = {connection.placeholder}",
            [name],
        )

    def next_batch(self, connection: TargetConnection) -> int:
        rows = connection.fetch_dicts(
            f"SELECT MAX(batch) AS batch FROM {connection.quote(self.migrations_table)}"  # noqa: S608
        )
        return int(rows[0]["batch"] or 0) + 1

    def repair_lock_table(
        self,
        connection: TargetConnection,
        *,
        release: bool,
        expected_rows: list[dict[str, Any]] | None = None,
    ) -> list[str]:
        # Knex expects exactly one row: it inserts it when missing, and so does this.
        table = connection.quote(self.lock_table)
        index = connection.quote("index")
        changes = []
        with connection.transaction():
            rows = self.read_lock(connection, for_update=True).rows
            release = _still_the_lock_judged_stale(rows, release, expected_rows, changes)
            if not rows:
                connection.execute(f"INSERT INTO {table} (is_locked) VALUES (0)")  # noqa: S608
                changes.append("inserted the missing lock row (is_locked = 0)")
            elif len(rows) > 1:
                # Without ``release``, keep a row that holds the lock, if any does, so that
                # tidying never frees a lock that is not stale.
                held = [row["index"] for row in rows if self.row_holds_lock(row)]
                keep = min(held) if held and not release else min(row["index"] for row in rows)
                connection.execute(
                    f"DELETE FROM {table} WHERE {index} <> {connection.placeholder}",  # noqa: S608
                    [keep],
                )
                extra = [row for row in rows if row["index"] != keep]
                changes.append(f"removed {len(extra)} extra lock row(s): {describe_rows(extra)}")
            if release and any(self.row_holds_lock(row) for row in rows):
                self._release(connection)
                changes.append("released the stale lock (is_locked = 0)")
        return changes


CONVENTIONS: dict[str, Convention] = {
    convention.name: convention for convention in (RunbookConvention(), KnexConvention())
}


def get_convention(name: str) -> Convention:
    try:
        return CONVENTIONS[name]
    except KeyError:
        known = ", ".join(sorted(CONVENTIONS))
        raise EngineError(f"unknown convention {name!r} (known: {known})") from None
