"""Candidate optimisations, applied by monkeypatching in the bench process and in the worker
(``force_unlock.py --variant NAME``), to measure them before anyone changes the real code.
Each mirrors a diff proposed in the bench report; none is used outside the bench.

- ``target-conn-cache``: keep target connections open per process (target_connection_cache.py).
- ``fewer-target-queries``: check a convention's two tables in one query, and do not check them
  again for the re-read inside the release transaction.
- ``console-db-pool``: Django's psycopg connection pool for the console database, so the
  worker stops opening a new connection for every task (Celery's Django fix-up closes the
  connection before and after each task; with a pool, closing gives it back). Needs
  ``psycopg_pool`` importable (the ``psycopg[pool]`` extra).
"""

from __future__ import annotations

import os

ENV_VAR = "BENCH_VARIANTS"


def _target_conn_cache() -> None:
    from target_connection_cache import ConnectionCache

    from migrations_ops import engine

    engine.connect = ConnectionCache().connect  # services.open_target looks it up per call


def _fewer_target_queries() -> None:
    from migrations_ops.engine.connection import TargetConnection
    from migrations_ops.engine.conventions import Convention, LockState, describe_rows, jsonable
    from migrations_ops.engine.errors import (
        EngineError,
        LockChanged,
        LockNotHeld,
        NotAMigrationsDatabase,
    )

    def missing_tables(self: TargetConnection, tables: tuple[str, ...]) -> list[str]:
        if self.dialect == "postgresql":
            rows = self.fetch_dicts(
                "SELECT to_regclass(name) IS NOT NULL AS found "
                "FROM unnest(%s::text[]) WITH ORDINALITY AS t(name, position) ORDER BY position",
                [[self.quote(table) for table in tables]],
            )
            return [table for table, row in zip(tables, rows, strict=True) if not row["found"]]
        placeholders = ", ".join("?" for _ in tables)
        rows = self.fetch_dicts(
            f"SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ({placeholders})",
            list(tables),
        )
        found = {row["name"] for row in rows}
        return [table for table in tables if table not in found]

    def require_tables(self: TargetConnection, convention_name: str, *tables: str) -> None:
        missing = missing_tables(self, tables)
        if missing:
            where = f" in schema {self.schema!r}" if self.schema else ""
            raise NotAMigrationsDatabase(
                f"no {', '.join(missing)} table{'s' if len(missing) > 1 else ''}{where}: "
                f"this is not a {convention_name}-convention migrations database"
            )

    TargetConnection.require_tables = require_tables

    def read_lock(
        self, connection, *, for_update: bool = False, check_tables: bool = True
    ) -> LockState:
        if check_tables:
            self.require_tables(connection)
        query = f"SELECT * FROM {connection.quote(self.lock_table)}"
        if for_update and connection.dialect == "postgresql":
            query += " FOR UPDATE"
        rows = [{k: jsonable(v) for k, v in row.items()} for row in connection.fetch_dicts(query)]
        held_rows = [row for row in rows if self.row_holds_lock(row)]
        if not held_rows:
            return LockState(held=False, rows=rows)
        locked_at = self.locked_at(held_rows[0])
        return LockState(
            held=True, rows=rows, locked_at=locked_at, holder=self.holder(held_rows[0])
        )

    def release_lock(self, connection, *, expected_rows=None):
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
            # Same transaction, tables checked and lock rows locked just above.
            after = self.read_lock(connection, check_tables=False)
            if after.held:
                raise EngineError("the migration lock was still held after the release")
        return before, after

    Convention.read_lock = read_lock
    Convention.release_lock = release_lock


def _console_db_pool() -> None:
    from django.conf import settings
    from django.db import connections

    try:
        import psycopg_pool  # noqa: F401
    except ImportError:
        raise SystemExit(
            "--variant console-db-pool needs psycopg_pool: install psycopg[pool] or put it on "
            "PYTHONPATH"
        ) from None
    database = settings.DATABASES["default"]
    if database["ENGINE"] != "django.db.backends.postgresql":
        raise SystemExit("--variant console-db-pool needs a PostgreSQL console database")
    database.setdefault("OPTIONS", {})["pool"] = {"min_size": 1, "max_size": 4}
    database["CONN_HEALTH_CHECKS"] = True
    database["CONN_MAX_AGE"] = 0
    connections["default"].close()


VARIANTS = {
    "target-conn-cache": _target_conn_cache,
    "fewer-target-queries": _fewer_target_queries,
    "console-db-pool": _console_db_pool,
}


def apply(names: list[str]) -> None:
    """Apply the named variants in this process (after ``django.setup()``, before any query)."""
    for name in names:
        VARIANTS[name]()


def from_environment() -> list[str]:
    return [name for name in os.environ.get(ENV_VAR, "").split(",") if name]
