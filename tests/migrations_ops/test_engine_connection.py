"""Connections to real targets: reaching them, failing fast and safely, quoting, timeouts."""

import sqlite3
import time

import psycopg
import pytest

from migrations_ops.engine import (
    EngineError,
    NotAMigrationsDatabase,
    TargetUnreachable,
    connect,
    get_convention,
)
from tests.targets import PG_SERVER, drop_pg_schema, new_pg_schema

SECRET = "Hunter2-xyzzy"
EVIL = 'x"; DROP TABLE migrations; --'


def open_target(target, **kwargs):
    return connect(target.url, schema=target.schema, **kwargs)


def as_scheme(url: str, scheme: str) -> str:
    return scheme + "://" + url.split("://", 1)[1]


def with_password(url: str, password: str) -> str:
    # Trust authentication ignores the password, so the connection still succeeds.
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{password}@", 1)


# --- reaching PostgreSQL -----------------------------------------------------------------------
@pytest.mark.parametrize("password", [SECRET, "pa#ss-word", "pa?ss-word"])
def test_unreachable_postgresql_fails_fast_without_leaking_the_password(password):
    url = f"postgresql://ops:{password}@127.0.0.1:1/orders"
    started = time.monotonic()
    with pytest.raises(TargetUnreachable) as raised, connect(url, connect_timeout=5):
        pytest.fail("connected to a closed port")
    elapsed = time.monotonic() - started

    message = str(raised.value)
    assert elapsed < 2, f"took {elapsed:.1f}s; the connect timeout is 5s"
    assert message.startswith("cannot connect to target: ")
    assert "Connection refused" in message
    assert password not in message
    assert "\n" not in message


def test_driver_message_quoting_the_password_is_scrubbed():
    # libpq quotes the offending token, here the password itself, in its message.
    url = "postgresql://ops:top%zzsecret@127.0.0.1:1/orders"
    with pytest.raises(TargetUnreachable) as raised, connect(url):
        pass
    assert "top%zzsecret" not in str(raised.value)
    assert "invalid percent-encoded token" in str(raised.value)


def test_missing_postgresql_database_is_unreachable():
    with pytest.raises(TargetUnreachable) as raised, connect(f"{PG_SERVER}/no_such_db_4f2a"):
        pass
    assert 'database "no_such_db_4f2a" does not exist' in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("scheme", ["postgres", "pgsql", "PostgreSQL"])
def test_every_accepted_postgresql_scheme_connects(pg_target, scheme):
    pg_target.create_runbook_books()
    with connect(as_scheme(pg_target.url, scheme), schema=pg_target.schema) as conn:
        applied = get_convention("runbook").read_applied(conn)
    assert [m.name for m in applied] == ["001_create_users.sql", "002_add_email.sql"]


def test_database_error_inside_connection_is_engine_error_without_password(pg_target):
    url = with_password(pg_target.url, SECRET)
    with pytest.raises(EngineError) as raised, connect(url, schema=pg_target.schema) as conn:
        # The server quotes the bad value back, and the bad value is the password.
        conn.fetch_dicts("SELECT %s::integer AS n", [SECRET])
    message = str(raised.value)
    assert type(raised.value) is EngineError
    assert message.startswith("target database error: ")
    assert "invalid input syntax for type integer" in message
    assert SECRET not in message
    assert "\n" not in message


def test_connection_is_closed_when_the_block_ends(any_target):
    with open_target(any_target) as conn:
        assert conn.fetch_dicts("SELECT 1 AS one") == [{"one": 1}]
    with pytest.raises((psycopg.Error, sqlite3.Error)):
        conn.raw.execute("SELECT 1")


# --- SQLite files ------------------------------------------------------------------------------
def test_missing_sqlite_file_is_unreachable_and_not_created(tmp_path):
    path = tmp_path / "missing.sqlite3"
    with pytest.raises(TargetUnreachable) as raised, connect(f"sqlite:///{path}"):
        pass
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []
    assert str(raised.value).startswith(f"cannot open SQLite target {path}: ")


def test_sqlite_file_in_missing_directory_is_unreachable(tmp_path):
    path = tmp_path / "nowhere" / "app.sqlite3"
    with pytest.raises(TargetUnreachable), connect(f"sqlite:///{path}"):
        pass
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("name", ["app?x.sqlite3", "app#x.sqlite3", "app%3Fx.sqlite3"])
def test_missing_sqlite_file_with_uri_characters_in_its_name_is_not_created(tmp_path, name):
    # A "?" or "#" must not end the path early and drop mode=rw (which creates a new file).
    with pytest.raises(TargetUnreachable), connect(f"sqlite:///{tmp_path / name}"):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["app?x.sqlite3", "app#x.sqlite3", "my app %41.sqlite3"])
def test_sqlite_file_with_uri_characters_in_its_name_is_the_one_opened(tmp_path, name):
    path = tmp_path / name
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE marker (value TEXT)")
        setup.execute("INSERT INTO marker VALUES ('this file')")
    setup.close()
    with connect(f"sqlite:///{path}") as conn:
        assert conn.fetch_dicts("SELECT value FROM marker") == [{"value": "this file"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_schema_is_refused_for_sqlite(sqlite_target):
    with pytest.raises(EngineError) as raised, connect(sqlite_target.url, schema="public"):
        pass
    assert str(raised.value) == "a schema can only be set for PostgreSQL targets, not SQLite"


# --- schemas -----------------------------------------------------------------------------------
@pytest.mark.parametrize("convention", ["runbook", "knex"])
def test_schema_that_does_not_exist_is_not_a_migrations_database(pg_target, convention):
    with (
        pytest.raises(NotAMigrationsDatabase) as raised,
        connect(pg_target.url, schema="no_such_schema") as conn,
    ):
        get_convention(convention).read_lock(conn)
    message = str(raised.value)
    assert "in schema 'no_such_schema'" in message
    assert f"not a {convention}-convention migrations database" in message
    assert "\n" not in message


def test_schema_selects_whose_books_are_read(pg_target, targets_database_url):
    other = new_pg_schema(targets_database_url)
    try:
        pg_target.create_runbook_books(applied=("001_ours.sql",))
        other.create_runbook_books(applied=("001_theirs.sql", "002_theirs.sql"))
        runbook = get_convention("runbook")
        with open_target(pg_target) as conn:
            ours = [m.name for m in runbook.read_applied(conn)]
        with open_target(other) as conn:
            theirs = [m.name for m in runbook.read_applied(conn)]
    finally:
        drop_pg_schema(other)
    assert ours == ["001_ours.sql"]
    assert theirs == ["001_theirs.sql", "002_theirs.sql"]


def test_injection_in_schema_name_stays_a_name(pg_target):
    pg_target.create_runbook_books()
    with (
        pytest.raises(NotAMigrationsDatabase),
        connect(pg_target.url, schema=f'{pg_target.schema}"; DROP TABLE migrations; --') as conn,
    ):
        get_convention("runbook").read_applied(conn)
    assert len(pg_target.query("SELECT filename FROM migrations")) == 2


# --- quoting -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("identifier", "quoted"),
    [
        ("migrations", '"migrations"'),
        ("Mixed Case", '"Mixed Case"'),
        (EVIL, '"x""; DROP TABLE migrations; --"'),
        ('"', '""""'),
    ],
)
def test_quote_makes_one_identifier(any_target, identifier, quoted):
    with open_target(any_target) as conn:
        assert conn.quote(identifier) == quoted


def test_injection_in_a_table_name_is_looked_up_as_a_literal_name(any_target):
    any_target.create_runbook_books()
    with open_target(any_target) as conn:
        assert conn.table_exists(EVIL) is False
        assert conn.table_exists("migrations") is True
        with pytest.raises(NotAMigrationsDatabase) as raised:
            conn.require_tables("runbook", EVIL)
        with pytest.raises((psycopg.Error, sqlite3.Error)):
            conn.fetch_dicts(f"SELECT * FROM {conn.quote(EVIL)}")
    assert EVIL in str(raised.value)
    assert len(any_target.query("SELECT filename FROM migrations")) == 2


def test_table_with_a_hostile_name_is_read_as_that_table(any_target):
    any_target.create_runbook_books()
    any_target.execute(f'CREATE TABLE "{EVIL.replace(chr(34), chr(34) * 2)}" (note TEXT)')
    any_target.execute(
        f'INSERT INTO "{EVIL.replace(chr(34), chr(34) * 2)}" (note) VALUES (%s)', ("only row",)
    )
    with open_target(any_target) as conn:
        assert conn.table_exists(EVIL) is True
        rows = conn.fetch_dicts(f"SELECT note FROM {conn.quote(EVIL)}")
        conn.require_tables("runbook", EVIL, "migrations")
    assert rows == [{"note": "only row"}]
    assert len(any_target.query("SELECT filename FROM migrations")) == 2


# --- helpers and transactions ------------------------------------------------------------------
def test_fetch_dicts_and_execute(any_target):
    any_target.create_runbook_books()
    with open_target(any_target) as conn:
        p = conn.placeholder
        changed = conn.execute(f"UPDATE migrations SET filename = filename || {p}", ["~"])
        rows = conn.fetch_dicts("SELECT filename FROM migrations ORDER BY filename")
        nothing = conn.fetch_dicts("DELETE FROM migrations WHERE filename = 'none'")
    assert changed == 2
    assert rows == [{"filename": "001_create_users.sql~"}, {"filename": "002_add_email.sql~"}]
    assert nothing == []


def test_transaction_commits_or_rolls_back_as_a_whole(any_target):
    any_target.create_runbook_books()
    with open_target(any_target) as conn:
        with pytest.raises(RuntimeError), conn.transaction():
            conn.execute("DELETE FROM migrations")
            raise RuntimeError("stop half way")
        assert len(conn.fetch_dicts("SELECT * FROM migrations")) == 2
        with conn.transaction():
            conn.execute(
                f"DELETE FROM migrations WHERE filename = {conn.placeholder}",
                ["001_create_users.sql"],
            )
    assert any_target.query("SELECT filename FROM migrations") == [("002_add_email.sql",)]


# --- timeouts ----------------------------------------------------------------------------------
def test_statement_timeout_bounds_a_postgresql_statement(pg_target):
    started = time.monotonic()
    with pytest.raises(EngineError) as raised, open_target(pg_target, statement_timeout=1) as conn:
        conn.fetch_dicts("SELECT pg_sleep(10)")
    elapsed = time.monotonic() - started
    assert elapsed < 3, f"took {elapsed:.1f}s with a 1s statement timeout"
    assert "statement timeout" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_transactions_own_timeout_bounds_it_and_ends_with_it(pg_target):
    with open_target(pg_target, statement_timeout=30) as conn:
        with conn.transaction(timeout_seconds=0.5):
            inside = conn.fetch_dicts(
                "SELECT current_setting('statement_timeout') AS statement,"
                " current_setting('lock_timeout') AS lock"
            )
        after = conn.fetch_dicts("SELECT current_setting('statement_timeout') AS statement")
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled), conn.transaction(timeout_seconds=0.5):
            conn.execute("SELECT pg_sleep(10)")
        elapsed = time.monotonic() - started
        state = conn.raw.info.transaction_status
    assert inside == [{"statement": "500ms", "lock": "500ms"}]
    assert after == [{"statement": "30s"}]
    assert elapsed < 3, f"took {elapsed:.1f}s with a 0.5 s transaction timeout"
    assert state == psycopg.pq.TransactionStatus.IDLE  # rolled back, ready for the next use


def test_busy_sqlite_write_lock_is_waited_for_at_most_the_statement_timeout(sqlite_target):
    sqlite_target.create_runbook_books()
    blocker = sqlite3.connect(sqlite_target.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with (
            pytest.raises(EngineError) as raised,
            open_target(sqlite_target, statement_timeout=1) as conn,
            conn.transaction(),
        ):
            conn.execute("DELETE FROM migrations")
        elapsed = time.monotonic() - started
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert 0.5 < elapsed < 3
    assert "database is locked" in str(raised.value)
    assert len(sqlite_target.query("SELECT * FROM migrations")) == 2
