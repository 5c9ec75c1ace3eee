"""Candidate optimisations, applied by monkeypatching in the bench process and in the worker
(``force_unlock.py --variant NAME``), to measure them before anyone changes the real code.
Each but ``console-db-pool`` mirrors a diff proposed in the bench report; none is used outside
the bench. They replace code as it was at commit 52f7404: re-check them when the engine changes.

- ``target-conn-cache``: keep target connections open per process (target_connection_cache.py).
  The bench patches ``engine.connect`` for every caller; the proposed diff keeps connections
  only for lock reads and releases (``open_target(target, keep=True)``).
- ``fewer-target-queries``: check a convention's two tables in one query, and do not check them
  again for the re-read inside the release transaction.
- ``console-db-pool``: Django's psycopg connection pool for the console database, so the
  worker stops opening a new connection for every task (Celery's Django fix-up closes the
  connection before and after each task; with a pool, closing gives it back). Needs
  ``psycopg_pool`` importable (the ``psycopg[pool]`` extra). Measured, not proposed: the
  fix-up closes the whole pool in prefork workers, and it needs a new dependency.
- ``console-db-reuse``: the same without a new dependency, for every Celery pool: keep the
  worker's console connection under Django's own rules (CONN_MAX_AGE, CONN_HEALTH_CHECKS, closed
  after errors), as a web request would; Celery's fix-up is told to leave it
  (CELERY_DB_REUSE_MAX) and ``close_old_connections()`` runs around each task instead.
- ``gc-freeze``: move the objects alive after start-up out of the garbage collector's reach
  (``gc.freeze()``), in the bench process now and in the worker once it is ready, so a full
  collection no longer walks them (one took ~50 ms inside a timed run).
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
        if self.dialect != "postgresql":  # SQLite is in-process: a query per table costs nothing
            return [table for table in tables if not self.table_exists(table)]
        rows = self.fetch_dicts(
            "SELECT to_regclass(name) IS NOT NULL AS found "
            "FROM unnest(%s::text[]) WITH ORDINALITY AS t(name, position) ORDER BY position",
            [[self.quote(table) for table in tables]],
        )
        return [table for table, row in zip(tables, rows, strict=True) if not row["found"]]

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


def _console_db_reuse() -> None:
    from celery import signals
    from django.conf import settings
    from django.db import close_old_connections, connections

    settings.CELERY_DB_REUSE_MAX = 1000  # read by Celery's Django fix-up when the worker starts
    database = settings.DATABASES["default"]
    database["CONN_MAX_AGE"] = 60
    database["CONN_HEALTH_CHECKS"] = True
    connections["default"].close()

    @signals.task_prerun.connect(weak=False)
    @signals.task_postrun.connect(weak=False)
    def close_old(sender=None, **kwargs):
        if not getattr(getattr(sender, "request", None), "is_eager", False):
            close_old_connections()


def _gc_freeze() -> None:
    import gc

    from celery import signals

    gc.collect()
    gc.freeze()

    @signals.worker_ready.connect(weak=False)
    def freeze_after_start_up(**kwargs):
        gc.collect()
        gc.freeze()


VARIANTS = {
    "target-conn-cache": _target_conn_cache,
    "fewer-target-queries": _fewer_target_queries,
    "console-db-pool": _console_db_pool,
    "console-db-reuse": _console_db_reuse,
    "gc-freeze": _gc_freeze,
}


def apply(names: list[str]) -> None:
    """Apply the named variants in this process (after ``django.setup()``, before any query)."""
    for name in names:
        VARIANTS[name]()


def from_environment() -> list[str]:
    return [name for name in os.environ.get(ENV_VAR, "").split(",") if name]
