"""Kept target connections: reused when clean, never shared, replaced when dead or stale."""

import os
import time

import psycopg
import pytest

from migrations_ops.engine import EngineError
from migrations_ops.engine.connection import ConnectionCache


def backend_pid(conn) -> int:
    return conn.fetch_dicts("SELECT pg_backend_pid() AS pid")[0]["pid"]


@pytest.fixture
def cache():
    cache = ConnectionCache(max_idle=2)
    yield cache
    cache.clear()


def open_kept(cache, target, **kwargs):
    return cache.connect(target.url, schema=target.schema, **kwargs)


def test_a_clean_connection_is_reused(cache, pg_target):
    with open_kept(cache, pg_target) as conn:
        first = backend_pid(conn)
    with open_kept(cache, pg_target) as conn:
        assert backend_pid(conn) == first


SESSION = (
    "SELECT pg_backend_pid() AS pid, current_schema() AS schema,"
    " current_setting('statement_timeout') AS statement_timeout,"
    " current_setting('lock_timeout') AS lock_timeout,"
    " coalesce(current_setting('opsconsole_test.left_behind', true), '') AS custom_setting,"
    " current_user = session_user AS own_role,"
    " to_regclass('pg_temp.scratch') IS NOT NULL AS temporary_table,"
    " (SELECT count(*) FROM pg_prepared_statements) AS prepared_statements,"
    " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    "  AND pid = pg_backend_pid()) AS advisory_locks"
)


def test_a_kept_connection_is_lent_again_as_it_started(cache, pg_target):
    with open_kept(cache, pg_target, statement_timeout=7) as conn:
        started = conn.fetch_dicts(SESSION)[0]
        for statement in (
            "SET search_path TO public",
            "SET statement_timeout = '1min'",
            "SET lock_timeout = '2min'",
            "SET opsconsole_test.left_behind = 'yes'",
            "SET ROLE pg_monitor",
            "CREATE TEMPORARY TABLE scratch (id INTEGER)",
            "SELECT pg_advisory_lock(4242)",
            "PREPARE left_behind AS SELECT 1",
        ):
            conn.run(statement)
        assert conn.fetch_dicts(SESSION)[0] != started

    with open_kept(cache, pg_target, statement_timeout=7) as conn:
        assert conn.fetch_dicts(SESSION)[0] == started  # the same session, as it began
    assert started["schema"] == pg_target.schema
    assert (started["statement_timeout"], started["lock_timeout"]) == ("7s", "7s")
    assert started["custom_setting"] == ""
    assert (started["own_role"], started["temporary_table"]) == (True, False)
    assert (started["prepared_statements"], started["advisory_locks"]) == (0, 0)


def test_a_kept_connection_stays_in_use_however_often_it_is_reset(cache, pg_target):
    # psycopg prepares a statement run five times; the reset must not trip over its own.
    with open_kept(cache, pg_target) as conn:
        first = backend_pid(conn)
        conn.run("SET application_name = 'migration'")
    for attempt in range(12):
        with open_kept(cache, pg_target) as conn:
            assert backend_pid(conn) == first, f"replaced at lending {attempt}"
            assert conn.fetch_dicts("SHOW application_name")[0]["application_name"] == "opsconsole"
            conn.run("SET application_name = 'migration'")


def test_only_a_connection_a_migration_ran_on_is_reset(cache, pg_target):
    """The console's own statements leave the session as it was, so they cost no reset; this
    one breaks that rule on purpose to show that no reset happened."""
    with open_kept(cache, pg_target) as conn:
        conn.fetch_dicts("SELECT set_config('opsconsole_test.left_behind', 'yes', false)")
        assert conn.session_changed is False
    with open_kept(cache, pg_target) as conn:
        assert conn.fetch_dicts(SESSION)[0]["custom_setting"] == "yes"
        conn.run("SELECT 1")
        assert conn.session_changed is True
    with open_kept(cache, pg_target) as conn:
        assert conn.fetch_dicts(SESSION)[0]["custom_setting"] == ""
        assert conn.session_changed is False


def test_a_connection_is_lent_to_one_caller_at_a_time(cache, pg_target):
    with open_kept(cache, pg_target) as one, open_kept(cache, pg_target) as two:
        assert backend_pid(one) != backend_pid(two)


def test_a_connection_that_saw_an_error_is_closed(cache, pg_target):
    with pytest.raises(EngineError), open_kept(cache, pg_target) as conn:
        first = backend_pid(conn)
        conn.fetch_dicts("SELECT * FROM no_such_table")
    with open_kept(cache, pg_target) as conn:
        assert backend_pid(conn) != first


def test_a_connection_left_in_a_transaction_is_closed(cache, pg_target):
    with open_kept(cache, pg_target) as conn:
        first = backend_pid(conn)
        conn.raw.autocommit = False
        conn.fetch_dicts("SELECT 1 AS one")
    with open_kept(cache, pg_target) as conn:
        assert backend_pid(conn) != first


@pytest.mark.parametrize("migration_ran", [False, True], ids=["clean", "to-reset"])
def test_a_connection_the_server_dropped_is_replaced(cache, pg_target, migration_ran):
    with open_kept(cache, pg_target) as conn:
        first = backend_pid(conn)
        if migration_ran:
            conn.run("SELECT 1")
    with psycopg.connect(pg_target.url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (first,))
    time.sleep(0.1)
    with open_kept(cache, pg_target) as conn:
        assert backend_pid(conn) != first


def test_connections_are_kept_per_schema_and_timeouts(cache, pg_target):
    with open_kept(cache, pg_target) as conn:
        first = backend_pid(conn)
    with cache.connect(pg_target.url, schema=None) as conn:
        assert backend_pid(conn) != first
    with open_kept(cache, pg_target, statement_timeout=3) as conn:
        assert backend_pid(conn) != first


def test_stale_connections_are_not_reused(cache, pg_target):
    cache.max_lifetime = 0
    with open_kept(cache, pg_target) as conn:
        first = backend_pid(conn)
    with open_kept(cache, pg_target) as conn:
        assert backend_pid(conn) != first


def test_a_forked_child_opens_its_own(cache, pg_target):
    with open_kept(cache, pg_target) as conn:
        parent = backend_pid(conn)
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through its exit status)
        with open_kept(cache, pg_target) as conn:
            os._exit(0 if backend_pid(conn) != parent else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with open_kept(cache, pg_target) as conn:  # the child left the parent's session alone
        assert backend_pid(conn) == parent


def test_sqlite_is_opened_anew(cache, sqlite_target):
    with cache.connect(sqlite_target.url) as one:
        pass
    with cache.connect(sqlite_target.url) as two:
        assert two is not one
    assert cache._idle == []
