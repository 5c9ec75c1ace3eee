"""One connection to a target database, PostgreSQL or SQLite, behind one small interface."""

import contextlib
import re
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql

from .errors import EngineError, NotAMigrationsDatabase, TargetUnreachable
from .target_url import dialect_of, libpq_url, password_of, sqlite_path


def one_line(error: BaseException, secret: str | None = None) -> str:
    """A driver's error message cut to its first line (libpq adds hints below), with the
    secret scrubbed out."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = re.sub(r"\s+", " ", lines[0]) if lines else type(error).__name__
    if secret:
        text = text.replace(secret, "***")
    return text


class TargetConnection:
    """A DB-API connection to a target, in autocommit mode unless inside ``transaction()``."""

    def __init__(self, raw: Any, dialect: str, schema: str | None = None):
        self.raw = raw
        self.dialect = dialect
        self.schema = schema

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

    def require_tables(self, convention_name: str, *tables: str) -> None:
        missing = [table for table in tables if not self.table_exists(table)]
        if missing:
            where = f" in schema {self.schema!r}" if self.schema else ""
            raise NotAMigrationsDatabase(
                f"no {', '.join(missing)} table{'s' if len(missing) > 1 else ''}{where}: "
                f"this is not a {convention_name}-convention migrations database"
            )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction. On SQLite it takes the write lock up front (BEGIN IMMEDIATE), so
        what is read inside cannot change before it is written."""
        if self.dialect == "postgresql":
            with self.raw.transaction():
                yield
            return
        self.raw.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.raw.execute("ROLLBACK")
            raise
        self.raw.execute("COMMIT")

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
        raise EngineError(f"target database error: {one_line(error, password_of(url))}") from None
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
            options=f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}",
        )
    except psycopg.Error as error:
        raise TargetUnreachable(
            f"cannot connect to target: {one_line(error, password_of(url))}"
        ) from None
    connection = TargetConnection(raw, "postgresql", schema)
    if schema:
        raw.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    return connection


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
