"""One connection to a target database, PostgreSQL or SQLite, behind one small interface."""

import contextlib
import os
import re
import select
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import pq, sql

from .errors import EngineError, NotAMigrationsDatabase, TargetUnreachable
from .target_url import dialect_of, libpq_url, scrub, sqlite_path


def one_line(error: BaseException, url: str | None = None) -> str:
    """A driver's error message cut to its first line (libpq adds hints below), without the
    secrets of ``url``, the target's URL it may echo (``scrub``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = re.sub(r"\s+", " ", lines[0]) if lines else type(error).__name__
    return scrub(text, url) if url else text


class TargetConnection:
    """A DB-API connection to a target, in autocommit mode unless inside ``transaction()``."""

    def __init__(self, raw: Any, dialect: str, schema: str | None = None):
        self.raw = raw
        self.dialect = dialect
        self.schema = schema
        # Whether SQL not written here (a migration's) ran, or the session was SET: a kept
        # connection is then reset before it is lent again (see ConnectionCache).
        self.session_changed = False

    # --- SQL helpers -------------------------------------------------------------------------
    def quote(self, identifier: str) -> str:
        """Quote an identifier, so a name from a user can never become SQL."""
        if self.dialect == "postgresql":
            return sql.Identifier(identifier).as_string(self.raw)
        return '"' + identifier.replace('"', '""') + '"'

    @property
    def placeholder(self) -> str:
        return "%s" if self.dialect == "postgresql" else "?"

    def fetch_dicts(self, query: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self.raw.cursor()
        try:
            cursor.execute(query, params)
            if cursor.description is None:
                return []
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            cursor.close()

    def fetch_table(
        self, query: str, params: Sequence[Any] = ()
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """``fetch_dicts``, with the result's column names (known even when it has no rows)."""
        cursor = self.raw.cursor()
        try:
            cursor.execute(query, params)
            if cursor.description is None:
                return [], []
            names = [column[0] for column in cursor.description]
            return names, [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            cursor.close()

    def execute(self, query: str, params: Sequence[Any] = ()) -> int:
        cursor = self.raw.cursor()
        try:
            cursor.execute(query, params)
            return cursor.rowcount
        finally:
            cursor.close()

    def run(self, statement: str) -> int:
        """Run one statement of a migration as written: no parameters, so a literal ``%`` in
        it is not taken for a placeholder."""
        self.session_changed = True
        cursor = self.raw.cursor()
        try:
            cursor.execute(statement)
            return cursor.rowcount
        finally:
            cursor.close()

    def columns(self, table: str) -> list[str]:
        cursor = self.raw.cursor()
        try:
            cursor.execute(f"SELECT * FROM {self.quote(table)} WHERE 1 = 0")  # noqa: S608
            return [column[0] for column in cursor.description]
        finally:
            cursor.close()

    def timestamp(self, value):
        """A timestamp as a parameter: PostgreSQL takes the datetime, SQLite keeps ISO text."""
        return value if self.dialect == "postgresql" else value.isoformat(sep=" ")

    def table_exists(self, table: str) -> bool:
        if self.dialect == "postgresql":
            # to_regclass resolves through search_path, i.e. the target's schema.
            rows = self.fetch_dicts(
                "SELECT to_regclass(%s) IS NOT NULL AS found", [self.quote(table)]
            )
            return bool(rows[0]["found"])
        rows = self.fetch_dicts(
            "SELECT 1 AS found FROM sqlite_master WHERE type = 'table' AND name = ?", [table]
        )
        return bool(rows)

    def missing_tables(self, tables: Sequence[str]) -> list[str]:
        """Which of ``tables`` do not exist (on PostgreSQL, in one round trip)."""
        if self.dialect != "postgresql":  # SQLite is in-process: a query per table costs nothing
            return [table for table in tables if not self.table_exists(table)]
        rows = self.fetch_dicts(
            "SELECT to_regclass(name) IS NOT NULL AS found "
            "FROM unnest(%s::text[]) WITH ORDINALITY AS t(name, position) ORDER BY position",
            [[self.quote(table) for table in tables]],
        )
        return [table for table, row in zip(tables, rows, strict=True) if not row["found"]]

    def require_tables(self, convention_name: str, *tables: str) -> None:
        """Raise ``NotAMigrationsDatabase`` unless every table exists."""
        missing = self.missing_tables(tables)
        if missing:
            where = f" in schema {self.schema!r}" if self.schema else ""
            raise NotAMigrationsDatabase(
                f"no {', '.join(missing)} table{'s' if len(missing) > 1 else ''}{where}: "
                f"this is not a {convention_name}-convention migrations database"
            )

    def checked(self, tables: Sequence[str], query: str) -> str:
        """``query`` naming every one of ``tables`` (PostgreSQL): a CTE it never reads is not
        run, but its tables must exist, so a missing one fails the query (UndefinedTable)."""
        names = ", ".join(self.quote(table) for table in tables)
        return f"WITH opsconsole_tables AS (SELECT FROM {names} LIMIT 0) {query}"

    def fetch_checked(
        self, convention_name: str, tables: Sequence[str], queries: Sequence[str]
    ) -> list[tuple[list[str], list[dict[str, Any]]]]:
        """Each of ``queries`` (without parameters): its columns and rows, raising
        ``NotAMigrationsDatabase`` unless every one of ``tables`` exists. On PostgreSQL outside a
        transaction, all in one round trip: one message of the simple query protocol (one
        implicit transaction, so they see the target at one moment) whose first query names
        every table (a missing one fails it); the tables are looked at only when it fails. In
        a transaction, a failed query would end it: they go first."""
        if (
            self.dialect != "postgresql"
            or self.raw.info.transaction_status != pq.TransactionStatus.IDLE
        ):
            self.require_tables(convention_name, *tables)
            return [self.fetch_table(query) for query in queries]
        first, *rest = queries
        statements = [(self.checked(tables, first), ()), *((query, ()) for query in rest)]
        try:
            return self.run_together(statements)
        except psycopg.errors.UndefinedTable:
            self.require_tables(convention_name, *tables)
            raise

    def run_together(
        self, statements: Sequence[tuple[str, Sequence[Any]]]
    ) -> list[tuple[list[str], list[dict[str, Any]]]]:
        """PostgreSQL: several statements, each with its parameters (``%s``, and no other
        ``%``), in one round trip; returns each one's columns and rows (none for a statement
        that returns none). They are bound on the client (psycopg's ClientCursor) and sent as
        one message of the simple query protocol: the server stops at the first that fails,
        and outside a transaction runs them all in one."""
        text = "; ".join(query for query, _ in statements)
        params = [value for _, values in statements for value in values]
        cursor = psycopg.ClientCursor(self.raw)
        try:
            cursor.execute(text, params or None)
            results = []
            while True:
                columns = [column[0] for column in cursor.description or ()]
                rows = cursor.fetchall() if columns else []
                results.append((columns, [dict(zip(columns, row, strict=True)) for row in rows]))
                if not cursor.nextset():
                    return results
        finally:
            cursor.close()

    @contextlib.contextmanager
    def transaction(self, *, timeout_seconds: float | None = None) -> Iterator[None]:
        """A write transaction; with ``timeout_seconds``, every statement in it (and on
        PostgreSQL every wait for a lock) is bounded by that. On SQLite it takes the write lock
        up front (BEGIN IMMEDIATE), so what is read inside cannot change before it is written."""
        if self.dialect == "postgresql":
            begin = "BEGIN"
            if timeout_seconds is not None:
                milliseconds = max(1, int(timeout_seconds * 1000))
                begin += (
                    f"; SET LOCAL statement_timeout = {milliseconds}"
                    f"; SET LOCAL lock_timeout = {milliseconds}"
                )
            self.raw.execute(begin)  # no parameters: one round trip for all of it
            try:
                yield
            except BaseException:
                self.roll_back()
                raise
            self.raw.execute("COMMIT")
            return
        self.raw.execute("BEGIN IMMEDIATE")
        try:
            with self.interrupted_after(timeout_seconds):
                yield
        except BaseException:
            # SQLite rolls some failures back by itself (an interrupted statement, ON CONFLICT
            # ROLLBACK): a second ROLLBACK would fail and hide the error that caused it.
            if self.raw.in_transaction:
                self.raw.execute("ROLLBACK")
            raise
        self.raw.execute("COMMIT")

    def roll_back(self) -> None:
        """PostgreSQL: end the transaction, if one is open; a connection that cannot is
        closed, never lent again with a transaction open (the error that caused it is the one
        to report)."""
        if self.raw.closed or self.raw.info.transaction_status == pq.TransactionStatus.IDLE:
            return
        try:
            self.raw.execute("ROLLBACK")
        except psycopg.Error:
            self.close()

    @contextlib.contextmanager
    def interrupted_after(self, seconds: float | None) -> Iterator[None]:
        """SQLite has no statement timeout: interrupt whatever still runs past the deadline."""
        if seconds is None:
            yield
            return
        deadline = time.monotonic() + seconds
        self.raw.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        try:
            yield
        finally:
            self.raw.set_progress_handler(None, 0)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()


@contextlib.contextmanager
def connect(
    url: str,
    *,
    schema: str | None = None,
    connect_timeout: int = 5,
    statement_timeout: int = 10,
) -> Iterator[TargetConnection]:
    """Open a connection to the target, or raise ``TargetUnreachable`` within the timeout.

    Every statement is bounded by ``statement_timeout`` seconds and every wait for a row lock
    by the same, so no read or release can hang on a busy target.
    """
    dialect = dialect_of(url)
    connection = (
        _connect_postgresql(url, schema, connect_timeout, statement_timeout)
        if dialect == "postgresql"
        else _connect_sqlite(url, schema, statement_timeout)
    )
    try:
        yield connection
    except (psycopg.Error, sqlite3.Error) as error:
        raise EngineError(f"target database error: {one_line(error, url)}") from None
    finally:
        connection.close()


def _connect_postgresql(
    url: str, schema: str | None, connect_timeout: int, statement_timeout: int
) -> TargetConnection:
    timeout_ms = max(1, statement_timeout) * 1000
    try:
        raw = psycopg.connect(
            libpq_url(url),
            autocommit=True,
            connect_timeout=max(1, connect_timeout),
            application_name="opsconsole",
            # Set at start-up, these are what RESET ALL (and so a kept connection's reset)
            # returns to.
            options=f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}",
            # A send the server never acknowledges (a dead network) fails after this long,
            # which no server-side timeout can ensure: so a kept connection's reset, too.
            tcp_user_timeout=max(1, connect_timeout) * 1000,
            # No server-side prepared statements: psycopg would prepare a kept connection's
            # DISCARD ALL after five resets, and that statement then drops itself.
            prepare_threshold=None,
        )
    except psycopg.Error as error:
        raise TargetUnreachable(f"cannot connect to target: {one_line(error, url)}") from None
    connection = TargetConnection(raw, "postgresql", schema)
    _set_search_path(connection)
    return connection


def _set_search_path(connection: TargetConnection) -> None:
    if connection.schema:
        connection.raw.execute(
            sql.SQL("SET search_path TO {}").format(sql.Identifier(connection.schema))
        )


def _connect_sqlite(url: str, schema: str | None, statement_timeout: int) -> TargetConnection:
    if schema:
        raise EngineError("a schema can only be set for PostgreSQL targets, not SQLite")
    path = sqlite_path(url)
    try:
        # mode=rw: a missing file is an error, never a new empty database. The path is
        # percent-encoded so a "?" or "#" in it cannot end it early and drop mode=rw.
        raw = sqlite3.connect(
            f"file:{quote(path)}?mode=rw", uri=True, timeout=statement_timeout, isolation_level=None
        )
        raw.execute("SELECT 1")
    except sqlite3.Error as error:
        raise TargetUnreachable(f"cannot open SQLite target {path}: {one_line(error)}") from None
    return TargetConnection(raw, "sqlite")


class ConnectionCache:
    """Idle PostgreSQL target connections, kept for reuse within one process.

    - A connection is lent to one caller at a time (taken out, then given back), so threads
      never share one.
    - It is given back only after a clean exit, idle in autocommit with no transaction open; a
      connection that saw any error is closed.
    - Before it is lent again after a migration's own SQL ran on it (``session_changed``),
      its session is reset to how a new connection starts (DISCARD ALL, then the schema's
      search_path): whatever that SQL left -- a SET, SET ROLE, a temporary table, a prepared
      statement, a session-level advisory lock, LISTEN -- is gone. The console's own
      statements leave nothing behind, so after them no reset is needed.
    - Before it is lent it is also checked to be alive, one the server dropped being replaced
      by a new connection, so a restarted target costs a reconnect, not a failure: the reset
      is that check, and without one the socket is looked at without a round trip (a server
      that ends a session -- restart, pg_terminate_backend, idle_session_timeout -- says so
      on it, and an idle session is otherwise sent nothing).
    - It is keyed by everything that shapes the session (URL, schema, timeouts), so a changed
      URL or schema never reuses an old session.
    - At most ``max_idle`` connections stay open in all. One idle longer than
      ``max_idle_seconds``, or opened more than ``max_lifetime`` seconds ago, is closed rather
      than reused, so a failover or a changed password is followed within that time even if
      the old server keeps answering. (Closing is lazy: when the cache is next used.)
    - After a fork the child forgets the parent's connections without closing them (closing
      would end the parent's sessions too).
    - SQLite files are opened anew every time, as before: that costs microseconds.
    """

    def __init__(
        self, *, max_idle: int = 8, max_idle_seconds: float = 60.0, max_lifetime: float = 300.0
    ):
        self.max_idle = max_idle
        self.max_idle_seconds = max_idle_seconds
        self.max_lifetime = max_lifetime
        self._lock = threading.Lock()
        # (key, opened at, idle since, connection), the longest idle first
        self._idle: list[tuple[tuple, float, float, TargetConnection]] = []
        self._pid = os.getpid()

    @contextlib.contextmanager
    def connect(
        self,
        url: str,
        *,
        schema: str | None = None,
        connect_timeout: int = 5,
        statement_timeout: int = 10,
    ) -> Iterator[TargetConnection]:
        key = None
        if dialect_of(url) != "postgresql":
            connection = _connect_sqlite(url, schema, statement_timeout)
        else:
            key = (url, schema or None, connect_timeout, statement_timeout)
            taken = self._take(key)
            if taken is None:
                opened_at = time.monotonic()
                connection = _connect_postgresql(url, schema, connect_timeout, statement_timeout)
            else:
                opened_at, connection = taken
        clean = False
        try:
            yield connection
            clean = True
        except (psycopg.Error, sqlite3.Error) as error:
            raise EngineError(f"target database error: {one_line(error, url)}") from None
        finally:
            if clean and key is not None and _reusable(connection):
                self._give_back(key, opened_at, connection)
            else:
                connection.close()

    def clear(self) -> None:
        """Close every idle connection (at shutdown, or in tests)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for *_, connection in idle:
            connection.close()

    # --- internals -----------------------------------------------------------------------------
    def _take(self, key: tuple) -> tuple[float, TargetConnection] | None:
        while True:
            with self._lock:
                expired = self._expire_locked()
                found = None
                for index in range(len(self._idle) - 1, -1, -1):  # the most recently used first
                    if self._idle[index][0] == key:
                        _, opened_at, _, connection = self._idle.pop(index)
                        found = (opened_at, connection)
                        break
            for connection in expired:
                connection.close()
            if found is None:
                return None
            connection = found[1]
            if _reset(connection) if connection.session_changed else _alive(connection):
                return found
            connection.close()

    def _give_back(self, key: tuple, opened_at: float, connection: TargetConnection) -> None:
        with self._lock:
            expired = self._expire_locked()
            self._idle.append((key, opened_at, time.monotonic(), connection))
            while len(self._idle) > self.max_idle:
                expired.append(self._idle.pop(0)[3])
        for old in expired:
            old.close()

    def _expire_locked(self) -> list[TargetConnection]:
        if os.getpid() != self._pid:  # a forked child: the sockets are the parent's
            self._idle, self._pid = [], os.getpid()
            return []
        now = time.monotonic()
        keep, expired = [], []
        for entry in self._idle:
            _, opened_at, idle_since, connection = entry
            too_old = now - opened_at > self.max_lifetime
            if too_old or now - idle_since > self.max_idle_seconds:
                expired.append(connection)
            else:
                keep.append(entry)
        self._idle = keep
        return expired


def _reusable(connection: TargetConnection) -> bool:
    raw = connection.raw
    return (
        not raw.closed
        and not raw.broken
        and raw.autocommit
        and raw.info.transaction_status == pq.TransactionStatus.IDLE
    )


def _alive(connection: TargetConnection) -> bool:
    """An idle connection with nothing to read is alive: the server sends an idle session
    nothing until it ends it (its last words, or the end of the stream, make it readable)."""
    try:
        readable, _, _ = select.select([connection.raw.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not readable and _reusable(connection)


def _reset(connection: TargetConnection) -> bool:
    """Return a kept connection's session to its start (see ``ConnectionCache``); False when
    the connection is dead or could not be reset, and must be closed."""
    try:
        # Also ends session-level advisory locks, temporary tables, SET ROLE and LISTEN; the
        # timeouts go back to those set at start-up, search_path to the server's default.
        connection.raw.execute("DISCARD ALL")
        _set_search_path(connection)
    except psycopg.Error:
        return False
    connection.session_changed = False
    return _reusable(connection)
