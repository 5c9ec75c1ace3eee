"""Running migrations on a target: apply and rollback, for real or as a dry run.

The shape every run keeps: take the target's own migration lock (committed, so the
application's migrator waits), run the SQL and update the books in ONE transaction with
``lock_timeout`` and ``statement_timeout`` set, and release the lock in that same transaction,
so the lock comes free at the very moment the migration commits. A failure rolls the
transaction back, so the target is exactly as before, and the lock is then released on its
own; a dry run rolls back on purpose after measuring what changed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg

from . import catalog
from .connection import TargetConnection, one_line
from .conventions import AppliedMigration, Convention, LockState, describe_rows
from .errors import EngineError

Log = Callable[[str], None]
# Shown the books as read under the lock, before any SQL runs; raises EngineError to stop.
BooksCheck = Callable[[list[AppliedMigration]], None]


class StatementLike(Protocol):
    sql: str
    line: int


class RunnableScript(Protocol):
    version: str
    name: str
    filename: str
    up_statements: Sequence[StatementLike]
    down_statements: Sequence[StatementLike]
    transactional: bool
    needs_no_transaction: Sequence[str]


class LockBusy(EngineError):
    """Someone else holds the target's migration lock and kept it past every attempt."""


class StatementFailed(EngineError):
    """A statement of a migration failed; ``report`` says what ran before it."""

    def __init__(self, message: str, report: RunReport):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Step:
    """One migration to run: ``up`` records ``book_name`` as applied, ``down`` removes it."""

    direction: str
    script: RunnableScript
    book_name: str

    @property
    def statements(self) -> Sequence[StatementLike]:
        return self.script.up_statements if self.direction == "up" else self.script.down_statements

    @property
    def must_run_outside_transaction(self) -> bool:
        return not self.script.transactional or bool(self.script.needs_no_transaction)


@dataclass
class RunSettings:
    holder: str
    lock_wait_seconds: float = 60
    max_retries: int = 0
    statement_timeout_seconds: float = 300
    dry_run: bool = False
    allow_non_transactional: bool = False
    poll_seconds: float = 0.25


@dataclass
class RunReport:
    dry_run: bool
    transactional: bool = True
    statements: list[dict[str, Any]] = field(default_factory=list)
    books: list[str] = field(default_factory=list)
    changes: list[dict[str, str]] = field(default_factory=list)
    committed: bool = False
    lock_attempts: int = 0
    # The lock as the release left it; None if the release failed (not part of the report).
    lock_after: LockState | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "transactional": self.transactional,
            "committed": self.committed,
            "statements": self.statements,
            "books": self.books,
            "changes": self.changes,
            "lock_attempts": self.lock_attempts,
        }


class _DryRunDone(Exception):
    """Raised inside the transaction to roll a dry run back."""


def run(
    connection: TargetConnection,
    convention: Convention,
    steps: Sequence[Step],
    settings: RunSettings,
    log: Log,
    *,
    check_books: BooksCheck | None = None,
) -> RunReport:
    """Run ``steps`` under the target's migration lock. ``check_books``: what the steps were
    planned from still holds (the books can change until the lock is ours)."""
    if not steps:
        raise EngineError("nothing to run")
    outside = [step for step in steps if step.must_run_outside_transaction]
    transactional = not outside
    if outside:
        _check_non_transactional(steps, outside, settings)
    report = RunReport(dry_run=settings.dry_run, transactional=transactional)
    report.lock_attempts = acquire_lock(connection, convention, settings, log)
    try:
        if transactional:
            _run_in_transaction(connection, convention, steps, settings, report, log, check_books)
        else:
            _run_statement_by_statement(
                connection, convention, steps[0], settings, report, log, check_books
            )
    finally:
        if report.lock_after is None:  # not released with a committed migration
            report.lock_after = _release(connection, convention, settings.holder, log)
    return report


def _check_non_transactional(
    steps: Sequence[Step], outside: Sequence[Step], settings: RunSettings
) -> None:
    step = outside[0]
    if not step.script.transactional:
        why = "is marked to run outside a transaction"
    else:
        offending = step.script.needs_no_transaction[0]
        why = f"has statements that cannot run in a transaction ({offending})"
    if not settings.allow_non_transactional:
        raise EngineError(
            f"{step.script.filename} {why}: a failure half-way could not be rolled back; "
            "ask for it explicitly (--non-transactional) to run it statement by statement"
        )
    if settings.dry_run:
        raise EngineError(f"{step.script.filename} {why}: it cannot be dry-run")
    if len(steps) > 1:
        raise EngineError(
            f"{step.script.filename} {why}: run it on its own (apply up to version "
            f"{step.script.version}, or the versions before it first)"
        )


def acquire_lock(
    connection: TargetConnection, convention: Convention, settings: RunSettings, log: Log
) -> int:
    """Take the target's migration lock: each attempt waits at most ``lock_wait_seconds``,
    and ``max_retries`` more attempts follow the first. Returns the attempts it took."""
    attempts = 1 + max(0, settings.max_retries)
    # A stale lock is refused at once: the first try shows it the lock it found held.
    when_held = functools.partial(_refuse_stale_lock, settings=settings)
    for attempt in range(1, attempts + 1):
        deadline = time.monotonic() + settings.lock_wait_seconds
        while True:
            if convention.try_take_lock(connection, settings.holder, when_held=when_held):
                log(f"took the migration lock (attempt {attempt})")
                return attempt
            when_held = None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(settings.poll_seconds, remaining))
        log(f"attempt {attempt} of {attempts}: the lock stayed held {settings.lock_wait_seconds} s")
    lock = convention.read_lock(connection)
    holder = f" by {lock.holder}" if lock.holder else ""
    since = f" since {lock.locked_at.isoformat()}" if lock.locked_at else ""
    raise LockBusy(
        f"the migration lock is held{holder}{since} ({describe_rows(lock.rows)}); gave up after "
        f"{attempts} attempt(s) of {settings.lock_wait_seconds:g} s: nothing was changed"
    )


def _refuse_stale_lock(lock: LockState, *, settings: RunSettings) -> None:
    """A lock older than the lock timeout will not be released by waiting: its holder is gone."""
    if not (lock.held and lock.locked_at):
        return
    age = (dt.datetime.now(dt.UTC) - lock.locked_at).total_seconds()
    if age > settings.lock_wait_seconds:
        holder = f" by {lock.holder}" if lock.holder else ""
        raise LockBusy(
            f"the migration lock is stale (held{holder} for {int(age)} s, longer than the lock "
            f"timeout of {settings.lock_wait_seconds:g} s): release it first; nothing was changed"
        )


def _release(
    connection: TargetConnection, convention: Convention, holder: str, log: Log
) -> LockState | None:
    try:
        after = convention.release_own_lock(connection, holder)
    except (EngineError, psycopg.Error, sqlite3.Error) as error:
        # The lock row is ours and stays behind: it shows as held by this holder until the
        # lock timeout makes it stale and cleanup or force-unlock removes it.
        log(f"could not release the migration lock: {one_line(error)}")
        return None
    log("released the migration lock")
    return after


def _check_books(
    connection: TargetConnection, convention: Convention, check_books: BooksCheck | None
) -> None:
    if check_books is not None:
        # The tables were checked when the lock was taken.
        check_books(convention.read_applied(connection, check_tables=False))


def _run_in_transaction(
    connection: TargetConnection,
    convention: Convention,
    steps: Sequence[Step],
    settings: RunSettings,
    report: RunReport,
    log: Log,
    check_books: BooksCheck | None,
) -> None:
    try:
        with connection.transaction(timeout_seconds=settings.statement_timeout_seconds):
            _check_books(connection, convention, check_books)
            # Only a dry run measures its effects: two catalog reads cost more than a small
            # migration, and would hold its table locks longer on a real run.
            before = catalog.snapshot(connection) if settings.dry_run else None
            batch = convention.next_batch(connection)
            now = dt.datetime.now(dt.UTC)
            for step in steps:
                _run_statements(connection, step, report, log)
                _keep_books(connection, convention, step, batch, now, report, log)
            if settings.dry_run:
                after = catalog.snapshot(connection)
                report.changes = [change.as_dict() for change in catalog.diff(before, after)]
                raise _DryRunDone
            lock_after = _release_in_transaction(connection, convention, settings.holder, report)
    except _DryRunDone:
        log("dry run: rolled back; the target is unchanged")
        return
    except StatementFailed:
        log("rolled back: the target is exactly as before")
        raise
    report.committed = True
    report.lock_after = lock_after
    log("committed; released the migration lock with it")


def _release_in_transaction(
    connection: TargetConnection, convention: Convention, holder: str, report: RunReport
) -> LockState:
    """Release the lock as the migration's last statement: one commit makes both visible,
    so no other migrator can see the migration done and the lock still held."""
    try:
        return convention.release_own_lock(connection, holder)
    except (psycopg.Error, sqlite3.Error) as error:
        raise StatementFailed(
            f"releasing the migration lock failed: {one_line(error)}; all rolled back", report
        ) from None


def _run_statement_by_statement(
    connection: TargetConnection,
    convention: Convention,
    step: Step,
    settings: RunSettings,
    report: RunReport,
    log: Log,
    check_books: BooksCheck | None,
) -> None:
    _check_books(connection, convention, check_books)
    log(f"{step.script.filename}: running statement by statement, outside a transaction")
    with _bounded_session(connection, settings.statement_timeout_seconds):
        _run_statements(connection, step, report, log, outside_transaction=True)
    now = dt.datetime.now(dt.UTC)
    with connection.transaction():
        _keep_books(
            connection, convention, step, convention.next_batch(connection), now, report, log
        )
    report.committed = True


def _run_statements(
    connection: TargetConnection,
    step: Step,
    report: RunReport,
    log: Log,
    *,
    outside_transaction: bool = False,
) -> None:
    statements = step.statements
    for number, statement in enumerate(statements, start=1):
        started = time.perf_counter()
        try:
            rowcount = connection.run(statement.sql)
        except (psycopg.Error, sqlite3.Error) as error:
            done = f"; {number - 1} of {len(statements)} statement(s) had completed" + (
                " and were NOT rolled back" if outside_transaction else ", all rolled back"
            )
            raise StatementFailed(
                f"{step.script.filename} ({step.direction}) statement {number} at line "
                f"{statement.line} failed: {one_line(error)}{done}",
                report,
            ) from None
        elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
        report.statements.append(
            {
                "migration": step.script.filename,
                "direction": step.direction,
                "number": number,
                "line": statement.line,
                "sql": statement.sql,
                "rowcount": rowcount,
                "ms": elapsed_ms,
            }
        )
        log(
            f"{step.script.filename} ({step.direction}) #{number} line {statement.line}: ok, "
            f"{elapsed_ms} ms"
        )


def _keep_books(
    connection: TargetConnection,
    convention: Convention,
    step: Step,
    batch: int,
    now: dt.datetime,
    report: RunReport,
    log: Log,
) -> None:
    if step.direction == "up":
        convention.record_applied(connection, step.book_name, batch, now)
        report.books.append(f"recorded {step.book_name} as applied")
    else:
        if convention.remove_applied(connection, step.book_name) != 1:
            raise StatementFailed(
                f"the books have no entry {step.book_name} to remove: rolled back", report
            )
        report.books.append(f"removed {step.book_name} from the books")
    log(report.books[-1])


@contextlib.contextmanager
def _bounded_session(connection: TargetConnection, seconds: float):
    """Bound every statement run outside a transaction (and every wait for a lock) by
    ``seconds``; in a transaction, ``connection.transaction(timeout_seconds=...)`` does it."""
    if connection.dialect != "postgresql":
        with connection.interrupted_after(seconds):
            yield
        return
    connection.session_changed = True  # set for the session: undone before its next use
    milliseconds = max(1, int(seconds * 1000))
    connection.execute(
        "SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false)",
        [str(milliseconds), str(milliseconds)],
    )
    yield


def mark(
    connection: TargetConnection,
    convention: Convention,
    *,
    applied: Sequence[str] = (),
    removed: Sequence[str] = (),
) -> list[str]:
    """Fix the books without running SQL: record ``applied`` names, remove ``removed`` ones."""
    changes = []
    with connection.transaction():
        batch = convention.next_batch(connection)
        now = dt.datetime.now(dt.UTC)
        for name in applied:
            convention.record_applied(connection, name, batch, now)
            changes.append(f"recorded {name} as applied (no SQL run)")
        for name in removed:
            if convention.remove_applied(connection, name) != 1:
                raise EngineError(f"the books have no entry {name}: nothing was changed")
            changes.append(f"removed {name} from the books (no SQL run)")
    return changes
