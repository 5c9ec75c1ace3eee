"""Taking and releasing a migration's own lock: what the lock table holds after each step,
whatever columns it has, and the advisory lock that serialises the console's takers."""

import threading

import psycopg
import pytest

from migrations_ops.engine import EngineError, connect, get_convention

runbook = get_convention("runbook")
knex = get_convention("knex")
HOLDER = "opsconsole operation #7 (alice)"


def open_target(target):
    return connect(target.url, schema=target.schema)


def lock_rows(target) -> list[tuple]:
    return target.query("SELECT * FROM migration_lock ORDER BY id")


def holders(target) -> list[str]:
    return [row[0] for row in target.query("SELECT locked_by FROM migration_lock ORDER BY id")]


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


def test_takers_wait_for_each_other_on_the_advisory_lock(pg_target):
    # Another console process between its advisory lock and its commit: this taker waits
    # for it, and then finds the lock as that one left it.
    pg_target.create_runbook_books()
    key = f"opsconsole:{pg_target.schema}:migration_lock"
    other = psycopg.connect(pg_target.url, autocommit=True)
    other.execute(f"SET search_path TO {pg_target.schema}")
    other.execute("BEGIN")
    other.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [key])
    other.execute("INSERT INTO migration_lock (id, locked_by) VALUES (1, 'console-2')")
    results = []
    with open_target(pg_target) as conn:
        taker = threading.Thread(target=lambda: results.append(runbook.try_take_lock(conn, HOLDER)))
        taker.start()
        taker.join(0.5)
        waited = taker.is_alive()
        other.execute("COMMIT")
        other.close()
        taker.join(5)
    assert waited, "the taker did not wait for the other's advisory lock"
    assert results == [False]  # the other taker's lock, committed while this one waited
    assert holders(pg_target) == ["console-2"]


def test_a_failed_take_leaves_no_transaction_open(pg_target):
    pg_target.create_runbook_books()
    pg_target.execute("ALTER TABLE migration_lock ADD CHECK (locked_by <> 'refused')")
    with open_target(pg_target) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            runbook.try_take_lock(conn, "refused")
        state = conn.raw.info.transaction_status
        assert runbook.try_take_lock(conn, HOLDER) is True  # the connection is usable again
    assert state == psycopg.pq.TransactionStatus.IDLE
    assert holders(pg_target) == [HOLDER]


def test_knex_take_then_release_returns_the_lock_free(any_target):
    any_target.create_knex_books(locked=False)
    with open_target(any_target) as conn:
        assert knex.try_take_lock(conn, HOLDER) is True
        assert any_target.knex_is_locked() == 1
        after = knex.release_own_lock(conn, HOLDER)
    assert after.held is False
    assert [row["is_locked"] for row in after.rows] == [0]
    assert any_target.knex_is_locked() == 0
