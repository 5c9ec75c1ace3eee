"""A per-process cache of open PostgreSQL target connections: the engine change the bench's
``--variant target-conn-cache`` measures, written so that it can move into
``migrations_ops/engine/connection.py`` as it is (see the proposed diff in the bench report).

``ConnectionCache.connect`` takes the arguments of ``engine.connect`` and behaves the same to
its caller; it only skips the connect (a new PostgreSQL backend: fork, authentication, cold
catalog caches) when an idle connection to the same target is at hand.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator

import psycopg
from psycopg import pq

from migrations_ops.engine.connection import (
    TargetConnection,
    _connect_postgresql,
    _connect_sqlite,
    one_line,
)
from migrations_ops.engine.errors import EngineError
from migrations_ops.engine.target_url import dialect_of, password_of


class ConnectionCache:
    """Idle PostgreSQL target connections, kept for reuse within one process.

    - A connection is lent to one caller at a time (taken out, then given back), so threads
      never share one.
    - It is given back only after a clean exit, idle in autocommit with no transaction open; a
      connection that saw any error is closed.
    - Before it is lent again it is pinged (an empty query, one round trip): one the server
      dropped is replaced by a new connection, so a restarted target costs a reconnect, not a
      failure.
    - It is keyed by everything that shapes the session (URL, schema, timeouts), so a changed
      URL or schema never reuses an old session.
    - At most ``max_idle`` connections stay open in all. One idle longer than
      ``max_idle_seconds``, or opened more than ``max_lifetime`` seconds ago, is closed rather
      than reused, so a failover or a changed password is followed within that time even if
      the old server keeps answering. (Closing is lazy: when the cache is next used.)
    - After a fork the child forgets the parent's connections without closing them (closing
      would end the parent's sessions too).
    - SQLite files are opened anew every time, as before: that costs microseconds.

    It cannot see session state a borrower leaves behind (a SET, a temporary table, a
    session-level advisory lock): lend kept connections only to work that leaves none, such as
    the console's own lock reads and releases, never to a migration's SQL.
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
            raise EngineError(
                f"target database error: {one_line(error, password_of(url))}"
            ) from None
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
            if _alive(found[1]):
                return found
            found[1].close()

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
    try:
        connection.raw.execute("")
    except psycopg.Error:
        return False
    return _reusable(connection)
