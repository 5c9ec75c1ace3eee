"""Real target databases for tests: PostgreSQL schemas in a scratch database, and SQLite files.

Each helper builds a convention's books the way the tool itself would have left them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"


@dataclass
class TargetDB:
    """A target database a test owns: ``url`` and ``schema`` are what a Target row would hold."""

    dialect: str
    url: str
    schema: str | None = None
    path: Path | None = None

    @contextlib.contextmanager
    def cursor(self):
        if self.dialect == "postgresql":
            with psycopg.connect(self.url, autocommit=True) as conn:
                if self.schema:
                    conn.execute(
                        sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema))
                    )
                with conn.cursor() as cur:
                    yield cur
        else:
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                yield conn.cursor()
            finally:
                conn.close()

    def execute(self, statement: str, params=()) -> None:
        with self.cursor() as cur:
            cur.execute(self._adapt(statement), params)

    def query(self, statement: str, params=()) -> list[tuple]:
        with self.cursor() as cur:
            cur.execute(self._adapt(statement), params)
            return list(cur.fetchall())

    def _adapt(self, statement: str) -> str:
        return statement.replace("%s", "?") if self.dialect == "sqlite" else statement

    @property
    def timestamp_type(self) -> str:
        return "TIMESTAMPTZ" if self.dialect == "postgresql" else "TIMESTAMP"

    # --- books ---------------------------------------------------------------------------------
    def create_runbook_books(
        self,
        *,
        applied: tuple[str, ...] = ("001_create_users.sql", "002_add_email.sql"),
        lock_age: dt.timedelta | None = None,
        locked_by: str | None = "deploy-7f3a (pid 4121)",
        with_locked_at: bool = True,
    ) -> None:
        """The runbook's books; a lock row taken ``lock_age`` ago when ``lock_age`` is given."""
        now = dt.datetime.now(dt.UTC)
        lock_columns = "id INTEGER PRIMARY KEY, locked_by TEXT"
        if with_locked_at:
            lock_columns += f", locked_at {self.timestamp_type}"
        self.execute(
            f"CREATE TABLE migrations (filename TEXT PRIMARY KEY, applied_at {self.timestamp_type})"
        )
        self.execute(f"CREATE TABLE migration_lock ({lock_columns})")
        for index, filename in enumerate(applied):
            applied_at = now - dt.timedelta(days=len(applied) - index)
            self.execute(
                "INSERT INTO migrations (filename, applied_at) VALUES (%s, %s)",
                (filename, self._ts(applied_at)),
            )
        if lock_age is not None:
            self.take_runbook_lock(
                lock_age=lock_age, locked_by=locked_by, with_locked_at=with_locked_at
            )

    def take_runbook_lock(
        self,
        *,
        lock_age: dt.timedelta = dt.timedelta(0),
        locked_by: str | None = "deploy-7f3a (pid 4121)",
        with_locked_at: bool = True,
    ) -> None:
        if with_locked_at:
            locked_at = dt.datetime.now(dt.UTC) - lock_age
            self.execute(
                "INSERT INTO migration_lock (id, locked_by, locked_at) VALUES (1, %s, %s)",
                (locked_by, self._ts(locked_at)),
            )
        else:
            self.execute("INSERT INTO migration_lock (id, locked_by) VALUES (1, %s)", (locked_by,))

    def create_knex_books(
        self,
        *,
        applied: tuple[str, ...] = ("20240101000000_init.js", "20240201000000_orders.js"),
        locked: bool = False,
    ) -> None:
        """Knex's books exactly as ``knex migrate:latest`` creates them."""
        serial = "SERIAL" if self.dialect == "postgresql" else "INTEGER"
        self.execute(
            f"CREATE TABLE knex_migrations (id {serial} PRIMARY KEY, name VARCHAR(255), "
            f"batch INTEGER, migration_time {self.timestamp_type})"
        )
        self.execute(
            f'CREATE TABLE knex_migrations_lock ("index" {serial} PRIMARY KEY, is_locked INTEGER)'
        )
        self.execute("INSERT INTO knex_migrations_lock (is_locked) VALUES (%s)", (int(locked),))
        now = dt.datetime.now(dt.UTC)
        for index, name in enumerate(applied):
            self.execute(
                "INSERT INTO knex_migrations (name, batch, migration_time) VALUES (%s, %s, %s)",
                (name, index + 1, self._ts(now - dt.timedelta(days=len(applied) - index))),
            )

    def runbook_lock_rows(self) -> list[tuple]:
        return self.query("SELECT id, locked_by FROM migration_lock")

    def knex_is_locked(self) -> int:
        return self.query("SELECT is_locked FROM knex_migrations_lock")[0][0]

    def _ts(self, value: dt.datetime):
        # SQLite keeps timestamps as ISO text, which is what most SQLite apps write.
        return value if self.dialect == "postgresql" else value.isoformat(sep=" ")


def create_pg_database(name: str) -> str:
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{PG_SERVER}/{name}"


def drop_pg_database(name: str) -> None:
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def new_pg_schema(database_url: str) -> TargetDB:
    schema = f"target_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    return TargetDB("postgresql", database_url, schema=schema)


def drop_pg_schema(target: TargetDB) -> None:
    with psycopg.connect(target.url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(target.schema))
        )


def new_sqlite_target(directory: Path) -> TargetDB:
    path = directory / f"target-{uuid.uuid4().hex[:8]}.sqlite3"
    sqlite3.connect(path).close()
    return TargetDB("sqlite", f"sqlite:///{path}", path=path)
