"""Conventions against real targets: reading and releasing runbook and knex locks."""

import datetime as dt
import decimal
import json
import sqlite3
import time

import psycopg
import pytest
from psycopg import sql

from migrations_ops.engine import (
    CONVENTIONS,
    EngineError,
    LockChanged,
    LockNotHeld,
    LockState,
    NotAMigrationsDatabase,
    connect,
    get_convention,
)
from migrations_ops.engine.conventions import parse_timestamp

UTC = dt.UTC
LOCKED_AT = dt.datetime(2024, 5, 1, 12, 30, 15, tzinfo=UTC)
# The same instant as another tool might have written it: with a +02:00 offset.
LOCKED_AT_PLUS_2 = LOCKED_AT.astimezone(dt.timezone(dt.timedelta(hours=2)))
EPOCH_SECONDS = 1714566615  # LOCKED_AT
assert dt.datetime.fromtimestamp(EPOCH_SECONDS, UTC) == LOCKED_AT

runbook = get_convention("runbook")
knex = get_convention("knex")


def open_target(target, **kwargs):
    return connect(target.url, schema=target.schema, **kwargs)


def take_runbook_lock(target, *, locked_by="deploy-42", locked_at=LOCKED_AT_PLUS_2, lock_id=1):
    target.execute(
        "INSERT INTO migration_lock (id, locked_by, locked_at) VALUES (%s, %s, %s)",
        (lock_id, locked_by, target._ts(locked_at)),
    )


def runbook_lock_with_time(target) -> list[tuple]:
    return target.query("SELECT id, locked_by, locked_at FROM migration_lock ORDER BY id")


def knex_lock_rows(target) -> list[tuple]:
    return target.query('SELECT "index", is_locked FROM knex_migrations_lock ORDER BY "index"')


def held_books(target, convention_name):
    """Books of the convention with the lock held; returns how to read the lock table back."""
    if convention_name == "runbook":
        target.create_runbook_books()
        take_runbook_lock(target)
        return runbook_lock_with_time
    target.create_knex_books(locked=True)
    return knex_lock_rows


def free_books(target, convention_name):
    if convention_name == "runbook":
        target.create_runbook_books()
        return runbook_lock_with_time
    target.create_knex_books(locked=False)
    return knex_lock_rows


# --- read_lock ---------------------------------------------------------------------------------
def test_runbook_lock_free(any_target):
    any_target.create_runbook_books()
    with open_target(any_target) as conn:
        state = runbook.read_lock(conn)
    assert state == LockState(held=False, rows=[], locked_at=None, holder=None)
    assert state.as_dict() == {"held": False, "rows": [], "locked_at": None, "holder": None}


def test_runbook_lock_held(any_target):
    any_target.create_runbook_books()
    take_runbook_lock(any_target, locked_by="deploy-42", locked_at=LOCKED_AT_PLUS_2)
    with open_target(any_target) as conn:
        state = runbook.read_lock(conn)

    assert state.held is True
    assert state.holder == "deploy-42"
    assert state.locked_at == LOCKED_AT
    assert state.locked_at.utcoffset() == dt.timedelta(0)
    [row] = state.rows
    assert row["id"] == 1
    assert row["locked_by"] == "deploy-42"
    assert parse_timestamp(row["locked_at"]) == LOCKED_AT
    assert set(row) == {"id", "locked_by", "locked_at"}
    as_dict = json.loads(json.dumps(state.as_dict()))
    assert as_dict["held"] is True
    assert as_dict["locked_at"] == "2024-05-01T12:30:15+00:00"
    assert as_dict["holder"] == "deploy-42"


def test_runbook_lock_held_by_nobody_named(any_target):
    any_target.create_runbook_books()
    take_runbook_lock(any_target, locked_by=None)
    with open_target(any_target) as conn:
        state = runbook.read_lock(conn)
    assert state.held is True
    assert state.holder is None
    assert state.locked_at == LOCKED_AT


def test_runbook_lock_table_without_locked_at_column(any_target):
    any_target.create_runbook_books(lock_age=dt.timedelta(minutes=5), with_locked_at=False)
    with open_target(any_target) as conn:
        state = runbook.read_lock(conn)
    assert state.held is True
    assert state.locked_at is None
    assert state.holder == "deploy-7f3a (pid 4121)"
    assert state.rows == [{"id": 1, "locked_by": "deploy-7f3a (pid 4121)"}]


def test_runbook_locked_at_is_utc_whatever_the_session_time_zone(pg_target, monkeypatch):
    pg_target.create_runbook_books()
    take_runbook_lock(pg_target)
    monkeypatch.setenv("PGTZ", "America/New_York")  # libpq sets the session's TimeZone from it
    with open_target(pg_target) as conn:
        assert conn.fetch_dicts("SHOW TimeZone") == [{"TimeZone": "America/New_York"}]
        state = runbook.read_lock(conn)
    assert state.locked_at == LOCKED_AT
    assert state.locked_at.utcoffset() == dt.timedelta(0)
    assert state.rows[0]["locked_at"] == "2024-05-01T12:30:15+00:00"


def test_runbook_lock_rows_are_json_ready_whatever_the_column_types(pg_target):
    pg_target.create_runbook_books()
    pg_target.execute(
        "ALTER TABLE migration_lock ADD COLUMN pid NUMERIC, ADD COLUMN ratio NUMERIC, "
        "ADD COLUMN token BYTEA, ADD COLUMN day DATE"
    )
    pg_target.execute(
        "INSERT INTO migration_lock (id, locked_by, locked_at, pid, ratio, token, day) "
        "VALUES (1, 'deploy-42', %s, 4121, 0.5, %s, '2024-05-01')",
        (LOCKED_AT, b"\x01\xff"),
    )
    with open_target(pg_target) as conn:
        state = runbook.read_lock(conn)
    assert state.rows == [
        {
            "id": 1,
            "locked_by": "deploy-42",
            "locked_at": "2024-05-01T12:30:15+00:00",
            "pid": 4121,
            "ratio": 0.5,
            "token": "01ff",
            "day": "2024-05-01",
        }
    ]
    assert json.loads(json.dumps(state.as_dict()))["rows"] == state.rows


@pytest.mark.parametrize(("locked", "held"), [(False, False), (True, True)])
def test_knex_lock(any_target, locked, held):
    any_target.create_knex_books(locked=locked)
    with open_target(any_target) as conn:
        state = knex.read_lock(conn)
    assert state.held is held
    assert state.rows == [{"index": 1, "is_locked": int(locked)}]
    # Knex's lock row keeps no time and no holder.
    assert state.locked_at is None
    assert state.holder is None


@pytest.mark.parametrize(
    ("value", "held"),
    [(1, True), (True, True), ("1", True), (0, False), (False, False), ("0", False), (None, False)],
)
def test_knex_is_locked_values(value, held):
    assert knex.row_holds_lock({"index": 1, "is_locked": value}) is held


# --- read_applied ------------------------------------------------------------------------------
def test_runbook_applied_in_order_of_application(any_target):
    any_target.create_runbook_books(applied=())
    day = dt.timedelta(days=1)
    for filename, applied_at in [
        ("003_late.sql", LOCKED_AT + day),
        ("002_b.sql", LOCKED_AT),
        ("001_first_but_applied_last.sql", LOCKED_AT + 2 * day),
        ("002_a.sql", LOCKED_AT),  # same time as 002_b: ties go by file name
    ]:
        any_target.execute(
            "INSERT INTO migrations (filename, applied_at) VALUES (%s, %s)",
            (filename, any_target._ts(applied_at)),
        )
    with open_target(any_target) as conn:
        applied = runbook.read_applied(conn)
    assert [(m.name, m.applied_at, m.batch) for m in applied] == [
        ("002_a.sql", LOCKED_AT, None),
        ("002_b.sql", LOCKED_AT, None),
        ("003_late.sql", LOCKED_AT + day, None),
        ("001_first_but_applied_last.sql", LOCKED_AT + 2 * day, None),
    ]
    assert all(m.applied_at.utcoffset() == dt.timedelta(0) for m in applied)
    assert applied[0].as_dict() == {
        "name": "002_a.sql",
        "applied_at": "2024-05-01T12:30:15+00:00",
        "batch": None,
    }


def test_runbook_applied_from_default_books(any_target):
    any_target.create_runbook_books()
    with open_target(any_target) as conn:
        applied = runbook.read_applied(conn)
    assert [m.name for m in applied] == ["001_create_users.sql", "002_add_email.sql"]
    assert applied[0].applied_at < applied[1].applied_at


def test_knex_applied_in_id_order_with_batches(any_target):
    any_target.create_knex_books(applied=("20240101_init.js", "20240201_orders.js", "2023_old.js"))
    with open_target(any_target) as conn:
        applied = knex.read_applied(conn)
    assert [(m.name, m.batch) for m in applied] == [
        ("20240101_init.js", 1),
        ("20240201_orders.js", 2),
        ("2023_old.js", 3),
    ]
    assert all(m.applied_at.tzinfo is not None for m in applied)
    assert applied[0].applied_at < applied[1].applied_at < applied[2].applied_at


# --- read: the lock and the books at once -------------------------------------------------------
@pytest.mark.parametrize("convention_name", ["runbook", "knex"])
def test_read_gives_the_lock_and_the_books_as_their_own_reads_do(any_target, convention_name):
    convention = get_convention(convention_name)
    if convention_name == "runbook":
        any_target.create_runbook_books()
        take_runbook_lock(any_target)
    else:
        any_target.create_knex_books(locked=True)
    with open_target(any_target) as conn:
        lock, applied = convention.read(conn)
        assert (lock, applied) == (convention.read_lock(conn), convention.read_applied(conn))
        # Inside a transaction it reads just the same (statement by statement).
        with conn.transaction():
            assert convention.read(conn) == (lock, applied)
    assert lock.held is True and lock.columns
    assert len(applied) == 2


def test_knex_applied_on_sqlite_with_epoch_milliseconds(sqlite_target):
    # knex on SQLite writes migration_time as JavaScript's Date.now(): epoch milliseconds.
    sqlite_target.create_knex_books(applied=())
    sqlite_target.execute(
        "INSERT INTO knex_migrations (name, batch, migration_time) VALUES (%s, %s, %s)",
        ("20240501_init.js", 1, EPOCH_SECONDS * 1000),
    )
    with open_target(sqlite_target) as conn:
        [migration] = knex.read_applied(conn)
    assert migration.name == "20240501_init.js"
    assert migration.batch == 1
    assert migration.applied_at == LOCKED_AT


def test_no_migrations_applied(any_target):
    any_target.create_runbook_books(applied=())
    any_target.create_knex_books(applied=())
    with open_target(any_target) as conn:
        assert runbook.read_applied(conn) == []
        assert knex.read_applied(conn) == []


# --- release_lock ------------------------------------------------------------------------------
def test_release_runbook_lock(any_target):
    any_target.create_runbook_books()
    take_runbook_lock(any_target, locked_by="deploy-42")
    with open_target(any_target) as conn:
        seen = runbook.read_lock(conn)
        before, after = runbook.release_lock(conn, expected_rows=seen.rows)

    assert before == seen
    assert before.held is True
    assert before.holder == "deploy-42"
    assert before.locked_at == LOCKED_AT
    assert [(r["id"], r["locked_by"]) for r in before.rows] == [(1, "deploy-42")]
    assert after == LockState(held=False, rows=[])
    assert any_target.runbook_lock_rows() == []
    assert len(any_target.query("SELECT filename FROM migrations")) == 2  # books untouched


def test_release_runbook_lock_removes_every_lock_row(any_target):
    any_target.create_runbook_books()
    take_runbook_lock(any_target, lock_id=1, locked_by="deploy-42")
    take_runbook_lock(any_target, lock_id=2, locked_by="deploy-43")
    with open_target(any_target) as conn:
        before, after = runbook.release_lock(conn)
    assert sorted(r["locked_by"] for r in before.rows) == ["deploy-42", "deploy-43"]
    assert after.held is False
    assert any_target.runbook_lock_rows() == []


def test_release_runbook_lock_without_locked_at_column(any_target):
    any_target.create_runbook_books(lock_age=dt.timedelta(hours=1), with_locked_at=False)
    with open_target(any_target) as conn:
        before, after = runbook.release_lock(conn)
    assert before.held is True
    assert before.locked_at is None
    assert after.held is False
    assert any_target.runbook_lock_rows() == []


def test_release_knex_lock(any_target):
    any_target.create_knex_books(locked=True)
    with open_target(any_target) as conn:
        seen = knex.read_lock(conn)
        before, after = knex.release_lock(conn, expected_rows=seen.rows)
    assert before == LockState(held=True, rows=[{"index": 1, "is_locked": 1}])
    assert after == LockState(held=False, rows=[{"index": 1, "is_locked": 0}])
    assert any_target.knex_is_locked() == 0
    assert len(any_target.query("SELECT name FROM knex_migrations")) == 2  # books untouched


@pytest.mark.parametrize("convention_name", ["runbook", "knex"])
def test_release_result_is_json_ready(any_target, convention_name):
    held_books(any_target, convention_name)
    with open_target(any_target) as conn:
        before, after = get_convention(convention_name).release_lock(conn)
    assert json.loads(json.dumps(before.as_dict()))["held"] is True
    assert json.loads(json.dumps(after.as_dict()))["held"] is False


@pytest.mark.parametrize("convention_name", ["runbook", "knex"])
def test_releasing_a_free_lock_raises_lock_not_held_and_changes_nothing(
    any_target, convention_name
):
    read_back = free_books(any_target, convention_name)
    convention = get_convention(convention_name)
    free = read_back(any_target)
    with open_target(any_target) as conn:
        with pytest.raises(LockNotHeld) as raised:
            convention.release_lock(conn)
        unchanged = read_back(any_target)
        # The failed release left no transaction open: others can take the lock (SQLite
        # would say "database is locked" otherwise), and this connection can release it.
        if convention_name == "runbook":
            take_runbook_lock(any_target)
        else:
            any_target.execute("UPDATE knex_migrations_lock SET is_locked = 1")
        before, after = convention.release_lock(conn)
    assert str(raised.value) == "the migration lock is not held: there is nothing to release"
    assert unchanged == free
    assert before.held is True
    assert after.held is False
    assert read_back(any_target) == free


def test_lock_retaken_by_someone_else_raises_lock_changed_and_stays_held(any_target):
    any_target.create_runbook_books()
    take_runbook_lock(any_target, locked_by="deploy-42")
    with open_target(any_target) as conn:
        seen = runbook.read_lock(conn)
        # deploy-42 finishes and deploy-43 takes the lock before the release runs.
        any_target.execute("DELETE FROM migration_lock")
        take_runbook_lock(any_target, locked_by="deploy-43", locked_at=LOCKED_AT_PLUS_2)
        retaken = runbook_lock_with_time(any_target)
        with pytest.raises(LockChanged) as raised:
            runbook.release_lock(conn, expected_rows=seen.rows)
        still = runbook.read_lock(conn)
    message = str(raised.value)
    assert message.startswith("the migration lock changed since the release was requested")
    assert "locked_by=deploy-43" in message
    assert "\n" not in message
    assert runbook_lock_with_time(any_target) == retaken
    assert still.held is True
    assert still.holder == "deploy-43"


def test_knex_lock_row_replaced_raises_lock_changed_and_stays_held(any_target):
    any_target.create_knex_books(locked=True)
    with open_target(any_target) as conn:
        seen = knex.read_lock(conn)
        any_target.execute("DELETE FROM knex_migrations_lock")
        any_target.execute('INSERT INTO knex_migrations_lock ("index", is_locked) VALUES (2, 1)')
        with pytest.raises(LockChanged):
            knex.release_lock(conn, expected_rows=seen.rows)
    assert knex_lock_rows(any_target) == [(2, 1)]


@pytest.mark.parametrize("convention_name", ["runbook", "knex"])
def test_lock_released_meanwhile_raises_lock_not_held(any_target, convention_name):
    held_books(any_target, convention_name)
    convention = get_convention(convention_name)
    with open_target(any_target) as conn:
        seen = convention.read_lock(conn)
        with open_target(any_target) as other:
            convention.release_lock(other)
        with pytest.raises(LockNotHeld):
            convention.release_lock(conn, expected_rows=seen.rows)
        assert convention.read_lock(conn).held is False


# --- missing tables ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("convention_name", "create", "missing"),
    [
        ("runbook", None, "no migrations, migration_lock tables"),
        ("runbook", "CREATE TABLE migrations (filename TEXT)", "no migration_lock table"),
        ("runbook", "CREATE TABLE migration_lock (id INTEGER)", "no migrations table"),
        ("knex", None, "no knex_migrations, knex_migrations_lock tables"),
        ("knex", "CREATE TABLE knex_migrations (id INTEGER)", "no knex_migrations_lock table"),
        ("knex", "CREATE TABLE knex_migrations_lock (x INTEGER)", "no knex_migrations table"),
        # The other tool's books are not these books.
        ("knex", "CREATE TABLE migrations (filename TEXT)", "no knex_migrations, knex_migrations_"),
    ],
)
@pytest.mark.parametrize("operation", ["read_lock", "read_applied", "read", "release_lock"])
def test_missing_tables_are_not_a_migrations_database(
    any_target, convention_name, create, missing, operation
):
    if create:
        any_target.execute(create)
    with open_target(any_target) as conn, pytest.raises(NotAMigrationsDatabase) as raised:
        getattr(get_convention(convention_name), operation)(conn)
    message = str(raised.value)
    assert message.startswith(missing)
    assert message.endswith(f": this is not a {convention_name}-convention migrations database")
    assert "\n" not in message
    if any_target.schema:
        assert f"in schema '{any_target.schema}'" in message


# --- waiting for a busy target -----------------------------------------------------------------
@pytest.mark.parametrize("convention_name", ["runbook", "knex"])
def test_release_waiting_for_a_row_lock_fails_within_the_statement_timeout(
    pg_target, convention_name
):
    read_back = held_books(pg_target, convention_name)
    held = read_back(pg_target)
    table = get_convention(convention_name).lock_table
    blocker = psycopg.connect(pg_target.url, autocommit=True)
    try:
        blocker.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(pg_target.schema)))
        blocker.execute("BEGIN")
        blocker.execute(sql.SQL("SELECT * FROM {} FOR UPDATE").format(sql.Identifier(table)))
        started = time.monotonic()
        with (
            pytest.raises(EngineError) as raised,
            open_target(pg_target, statement_timeout=1) as conn,
        ):
            get_convention(convention_name).release_lock(conn)
        elapsed = time.monotonic() - started
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert 0.5 < elapsed < 3, f"took {elapsed:.1f}s with a 1s statement timeout"
    assert type(raised.value) is EngineError
    # statement_timeout and lock_timeout are equal: either may fire first.
    assert "timeout" in str(raised.value)
    assert read_back(pg_target) == held


@pytest.mark.parametrize("convention_name", ["runbook", "knex"])
def test_release_waiting_for_sqlite_writer_fails_within_the_timeout(sqlite_target, convention_name):
    read_back = held_books(sqlite_target, convention_name)
    held = read_back(sqlite_target)
    blocker = sqlite3.connect(sqlite_target.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with (
            pytest.raises(EngineError) as raised,
            open_target(sqlite_target, statement_timeout=1) as conn,
        ):
            get_convention(convention_name).release_lock(conn)
        elapsed = time.monotonic() - started
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert 0.5 < elapsed < 3
    assert "database is locked" in str(raised.value)
    assert read_back(sqlite_target) == held


# --- parse_timestamp ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        LOCKED_AT,
        LOCKED_AT_PLUS_2,
        LOCKED_AT.replace(tzinfo=None),  # naive: UTC by the tools' convention
        "2024-05-01T12:30:15+00:00",
        "2024-05-01 12:30:15",
        "2024-05-01T12:30:15Z",
        "2024-05-01T14:30:15+02:00",
        " 2024-05-01 12:30:15 ",
        EPOCH_SECONDS,
        float(EPOCH_SECONDS),
        decimal.Decimal(EPOCH_SECONDS),
        str(EPOCH_SECONDS),
        EPOCH_SECONDS * 1000,
        str(EPOCH_SECONDS * 1000),
    ],
)
def test_parse_timestamp(value):
    parsed = parse_timestamp(value)
    assert parsed == LOCKED_AT
    assert parsed.utcoffset() == dt.timedelta(0)
    assert parsed.tzinfo is not None


def test_parse_timestamp_keeps_fractions():
    assert parse_timestamp("2024-05-01T12:30:15.250Z") == LOCKED_AT.replace(microsecond=250000)
    assert parse_timestamp(EPOCH_SECONDS * 1000 + 250) == LOCKED_AT.replace(microsecond=250000)


@pytest.mark.parametrize(
    "value", [None, "", "   ", "yesterday", "2024-13-45", "12:30 last Tuesday", True, False, [], {}]
)
def test_parse_timestamp_garbage_is_none(value):
    assert parse_timestamp(value) is None


# --- get_convention ----------------------------------------------------------------------------
def test_get_convention_known():
    assert set(CONVENTIONS) == {"runbook", "knex"}
    assert get_convention("runbook").lock_table == "migration_lock"
    assert get_convention("knex").lock_table == "knex_migrations_lock"


@pytest.mark.parametrize("name", ["flyway", "", "Runbook"])
def test_get_convention_unknown(name):
    with pytest.raises(EngineError) as raised:
        get_convention(name)
    assert str(raised.value) == f"unknown convention {name!r} (known: knex, runbook)"
