"""Taking and releasing a migration's own lock: what the lock table holds after each step,
whatever columns it has, and the advisory lock that serialises the console's takers."""

import pytest

from migrations_ops.engine import EngineError, connect, get_convention

runbook = get_convention("runbook")
knex = get_convention("knex")
HOLDER = "opsconsole operation #7 (alice)"


def open_target(target):
    return connect(target.url, schema=target.schema)


def lock_rows(target) -> list[tuple]:
    return target.query("SELECT * FROM migration_lock ORDER BY id")


def test_take_writes_holder_and_time_and_release_frees_it(any_target):
    any_target.create_runbook_books()
    with open_target(any_target) as conn:
        assert runbook.try_take_lock(conn, HOLDER) is True
        lock = runbook.read_lock(conn)
        assert (lock.held, lock.holder) == (True, HOLDER)
        assert lock.locked_at is not None
        after = runbook.release_own_lock(conn, HOLDER)
    assert (after.held, after.rows) == (False, [])
    assert lock_rows(any_target) == []


def test_release_leaves_other_holders_rows(any_target):
    any_target.create_runbook_books()
    with open_target(any_target) as conn:
        assert runbook.try_take_lock(conn, HOLDER) is True
        any_target.execute("INSERT INTO migration_lock (id, locked_by) VALUES (2, 'deploy-43')")
        after = runbook.release_own_lock(conn, HOLDER)
    assert [(row[0], row[1]) for row in lock_rows(any_target)] == [(2, "deploy-43")]
    # What the release returns is the lock as it is after: still held, by the other holder.
    assert (after.held, after.holder, [row["id"] for row in after.rows]) == (True, "deploy-43", [2])


def test_lock_table_without_holder_or_time_columns(any_target):
    any_target.create_runbook_books()
    any_target.execute("DROP TABLE migration_lock")
    any_target.execute("CREATE TABLE migration_lock (id INTEGER PRIMARY KEY)")
    with open_target(any_target) as conn:
        assert runbook.try_take_lock(conn, HOLDER) is True
        assert lock_rows(any_target) == [(1,)]
        runbook.release_own_lock(conn, HOLDER)
    assert lock_rows(any_target) == []


def test_release_after_the_holder_column_was_dropped_still_frees_the_lock(any_target):
    """A migration run under the lock may change the lock table itself."""
    any_target.create_runbook_books(with_locked_at=False)
    with open_target(any_target) as conn:
        assert runbook.try_take_lock(conn, HOLDER) is True
        any_target.execute("ALTER TABLE migration_lock DROP COLUMN locked_by")
        runbook.release_own_lock(conn, HOLDER)
    assert lock_rows(any_target) == []


@pytest.mark.parametrize("convention", [runbook, knex], ids=["runbook", "knex"])
def test_a_held_lock_is_not_taken(any_target, convention):
    if convention is runbook:
        any_target.create_runbook_books()
        any_target.take_runbook_lock(locked_by="deploy-42")
    else:
        any_target.create_knex_books(locked=True)
    seen = []
    with open_target(any_target) as conn:
        assert convention.try_take_lock(conn, HOLDER, when_held=seen.append) is False
    assert [lock.held for lock in seen] == [True]


def test_missing_tables_are_reported_before_taking(pg_target):
    with open_target(pg_target) as conn, pytest.raises(EngineError, match="no migrations, "):
        runbook.try_take_lock(conn, HOLDER)


def test_tables_check_takes_the_advisory_lock_until_the_transaction_ends(pg_target):
    pg_target.create_runbook_books()
    advisory_locks = (
        "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    )
    with open_target(pg_target) as conn:
        with conn.transaction():
            missing = conn.missing_tables(["migrations", "nope"], advisory_lock="opsconsole:k")
            assert missing == ["nope"]
            assert conn.fetch_dicts(advisory_locks)[0]["n"] == 1
        assert conn.fetch_dicts(advisory_locks)[0]["n"] == 0


def test_advisory_lock_is_refused_on_sqlite(sqlite_target):
    sqlite_target.create_runbook_books()
    with open_target(sqlite_target) as conn, pytest.raises(EngineError, match="PostgreSQL"):
        conn.missing_tables(["migrations"], advisory_lock="opsconsole:k")


def test_knex_take_then_release_returns_the_lock_free(any_target):
    any_target.create_knex_books(locked=False)
    with open_target(any_target) as conn:
        assert knex.try_take_lock(conn, HOLDER) is True
        assert any_target.knex_is_locked() == 1
        after = knex.release_own_lock(conn, HOLDER)
    assert after.held is False
    assert [row["is_locked"] for row in after.rows] == [0]
    assert any_target.knex_is_locked() == 0
