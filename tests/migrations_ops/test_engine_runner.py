"""The runner against real targets: PostgreSQL and SQLite, runbook and knex books.

Every test looks at the target afterwards the way an operator would: which tables exist, what
the books say, whether the migration lock is free.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass

import pytest

from migrations_ops.engine import (
    EngineError,
    LockBusy,
    RunSettings,
    StatementFailed,
    Step,
    connect,
    get_convention,
    parse_file,
    snapshot,
)
from migrations_ops.engine.runner import mark, run
from tests.targets import TargetDB

CONVENTION_NAMES = ["runbook", "knex"]
RUNBOOK_APPLIED = ("001_create_users.sql", "002_add_email.sql")
KNEX_APPLIED = ("20240101000000_init.js", "20240201000000_orders.js")
OTHER_HOLDER = "deploy-other (pid 999)"


@dataclass
class Books:
    """A target with a convention's books, and the reads an operator would make of it."""

    target: TargetDB
    name: str

    @property
    def convention(self):
        return get_convention(self.name)

    @property
    def dialect(self) -> str:
        return self.target.dialect

    def names(self) -> list[str]:
        if self.name == "runbook":
            return [r[0] for r in self.target.query("SELECT filename FROM migrations")]
        return [r[0] for r in self.target.query("SELECT name FROM knex_migrations ORDER BY id")]

    def batches(self) -> dict[str, int]:
        return dict(self.target.query("SELECT name, batch FROM knex_migrations"))

    def lock_rows(self) -> list[tuple]:
        if self.name == "runbook":
            return self.target.query("SELECT id, locked_by FROM migration_lock ORDER BY id")
        return self.target.query(
            'SELECT "index", is_locked FROM knex_migrations_lock ORDER BY "index"'
        )

    def lock_held(self) -> bool:
        if self.name == "runbook":
            return bool(self.lock_rows())
        return any(is_locked for _, is_locked in self.lock_rows())

    @property
    def held_rows_sql(self) -> str:
        """SQL counting the lock rows that hold the lock, for a migration to record."""
        if self.name == "runbook":
            return "SELECT count(*) AS n FROM migration_lock"
        return "SELECT count(*) AS n FROM knex_migrations_lock WHERE is_locked = 1"

    def take_lock_as_someone_else(self, *, age: dt.timedelta = dt.timedelta(0)) -> None:
        if self.name == "runbook":
            self.target.take_runbook_lock(lock_age=age, locked_by=OTHER_HOLDER)
        else:
            self.target.execute("UPDATE knex_migrations_lock SET is_locked = 1")

    def release_as_someone_else(self) -> None:
        if self.name == "runbook":
            self.target.execute("DELETE FROM migration_lock")
        else:
            self.target.execute("UPDATE knex_migrations_lock SET is_locked = 0")

    def tables(self) -> set[str]:
        with self.connect() as conn:
            return set(snapshot(conn).tables)

    def catalog(self):
        with self.connect() as conn:
            return snapshot(conn)

    def state(self):
        """Everything a failed or refused run must leave exactly as it was."""
        return self.catalog(), self.names(), self.lock_rows()

    def connect(self):
        return connect(self.target.url, schema=self.target.schema)

    def run(self, steps, **settings) -> tuple:
        """Run ``steps``; returns (report, log lines)."""
        lines: list[str] = []
        settings.setdefault("holder", "opsconsole-test")
        settings.setdefault("poll_seconds", 0.05)
        with self.connect() as conn:
            report = run(conn, self.convention, steps, RunSettings(**settings), lines.append)
        return report, lines


@pytest.fixture(params=CONVENTION_NAMES)
def books(request, any_target):
    """Books of each convention on each dialect, two migrations applied by the tool itself."""
    return make_books(any_target, request.param)


@pytest.fixture(params=CONVENTION_NAMES)
def pg_books(request, pg_target):
    return make_books(pg_target, request.param)


@pytest.fixture
def runbook_books(any_target):
    return make_books(any_target, "runbook")


def make_books(target: TargetDB, name: str) -> Books:
    if name == "runbook":
        target.create_runbook_books(applied=RUNBOOK_APPLIED)
    else:
        target.create_knex_books(applied=KNEX_APPLIED)  # batches 1 and 2
    return Books(target, name)


def dbmate(filename: str, up: str, down: str = "", options: str = ""):
    text = f"-- migrate:up {options}\n{up}\n"
    if down:
        text += f"-- migrate:down\n{down}\n"
    return parse_file(filename, text)


def up(*scripts):
    return [Step("up", script, script.filename) for script in scripts]


def kinds(report) -> set[tuple[str, str]]:
    return {(change["kind"], change["object"]) for change in report.changes}


def ran(report) -> list[tuple[str, str, int]]:
    return [(s["migration"], s["direction"], s["number"]) for s in report.statements]


USERS = dbmate(
    "20240301000000_users.sql",
    "CREATE TABLE users (id integer NOT NULL, email text);\n"
    "CREATE INDEX users_email_idx ON users (email);",
    "DROP TABLE users;",
)


def orders_script(books: Books, *, second: str | None = None):
    """Its second statement records how many rows held the lock while it ran."""
    return dbmate(
        "20240302000000_orders.sql",
        "CREATE TABLE orders (id integer, user_id integer);\n"
        f"{second or 'CREATE TABLE seen AS ' + books.held_rows_sql};",
        "DROP TABLE seen;\nDROP TABLE orders;",
    )


# --- apply -------------------------------------------------------------------------------------
def test_apply_several_pending_migrations_in_one_transaction(books):
    orders = orders_script(books)
    report, lines = books.run(up(USERS, orders))

    assert report.committed is True
    assert report.transactional is True
    assert report.dry_run is False
    assert report.lock_attempts == 1
    assert {"users", "orders", "seen"} <= books.tables()
    # While the migrations ran, the lock was held (one row held it), and now it is free.
    assert books.target.query("SELECT n FROM seen") == [(1,)]
    assert not books.lock_held()
    applied = list(RUNBOOK_APPLIED if books.name == "runbook" else KNEX_APPLIED)
    assert sorted(books.names()) == sorted([*applied, USERS.filename, orders.filename])
    if books.name == "knex":
        # One batch for everything this run applied: the previous highest plus one.
        assert books.batches() == {
            KNEX_APPLIED[0]: 1,
            KNEX_APPLIED[1]: 2,
            USERS.filename: 3,
            orders.filename: 3,
        }
    assert ran(report) == [
        (USERS.filename, "up", 1),
        (USERS.filename, "up", 2),
        (orders.filename, "up", 1),
        (orders.filename, "up", 2),
    ]
    assert [s["line"] for s in report.statements] == [2, 3, 2, 3]
    assert report.changes == []  # only dry runs measure their effects
    assert {"users", "orders", "seen"} <= set(books.tables())
    assert report.books == [
        f"recorded {USERS.filename} as applied",
        f"recorded {orders.filename} as applied",
    ]
    assert lines[0] == "took the migration lock (attempt 1)"
    assert lines[-1] == "committed; released the migration lock with it"


def test_the_lock_is_released_in_the_migrations_own_transaction(books):
    # A migration that renames the lock table away leaves the release nothing to release: the
    # release is part of the migration's transaction, so the whole migration is rolled back
    # with it, and the lock is then released from the table as it was.
    lock_table = "migration_lock" if books.name == "runbook" else "knex_migrations_lock"
    renames = dbmate(
        "20240303000000_rename_lock.sql",
        f"CREATE TABLE audit_log (id integer);\nALTER TABLE {lock_table} RENAME TO moved_lock;",
    )
    before = books.state()

    with pytest.raises(
        StatementFailed, match=r"^releasing the migration lock failed: .*all rolled back"
    ):
        books.run(up(renames))

    assert books.state() == before
    assert not books.lock_held()


def test_nothing_to_run_is_refused(books):
    before = books.state()
    with pytest.raises(EngineError, match=r"^nothing to run$"):
        books.run([])
    assert books.state() == before


def test_applying_an_entry_already_in_the_books_rolls_back_and_frees_the_lock(books):
    # The books already hold the name: recording it again fails (runbook: primary key) or
    # duplicates it (knex has no unique name). Either way, the lock must come free.
    name = RUNBOOK_APPLIED[1] if books.name == "runbook" else KNEX_APPLIED[1]
    step = Step("up", USERS, name)
    if books.name == "runbook":
        before = books.state()
        with pytest.raises(EngineError):
            books.run([step])
        assert books.state() == before
    else:
        books.run([step])
        assert books.names().count(name) == 2
    assert not books.lock_held()


# --- rollback ------------------------------------------------------------------------------------
def test_rollback_runs_down_sql_and_removes_the_entry(books):
    books.run(up(USERS))
    assert "users" in books.tables()
    report, _ = books.run([Step("down", USERS, USERS.filename)])

    assert report.committed is True
    assert "users" not in books.tables()
    assert USERS.filename not in books.names()
    assert sorted(books.names()) == sorted(
        RUNBOOK_APPLIED if books.name == "runbook" else KNEX_APPLIED
    )
    assert ran(report) == [(USERS.filename, "down", 1)]
    assert report.books == [f"removed {USERS.filename} from the books"]
    assert report.changes == []
    assert not books.lock_held()


def test_rollback_of_an_entry_not_in_the_books_undoes_its_down_sql(books):
    # The down SQL and the books change in one transaction: without the entry, the DROP is
    # rolled back too.
    books.run(up(USERS))
    books.target.execute("DELETE FROM " + books.convention.migrations_table)
    before = books.state()
    with pytest.raises(StatementFailed) as info:
        books.run([Step("down", USERS, USERS.filename)])
    assert str(info.value) == f"the books have no entry {USERS.filename} to remove: rolled back"
    assert books.state() == before
    assert "users" in books.tables()
    assert not books.lock_held()


# --- failure -------------------------------------------------------------------------------------
def test_failure_in_the_middle_rolls_everything_back(books):
    orders = orders_script(books, second="INSERT INTO nowhere (id) VALUES (1)")
    before = books.state()
    with pytest.raises(StatementFailed) as info:
        books.run(up(USERS, orders))
    message = str(info.value)
    assert message.startswith(f"{orders.filename} (up) statement 2 at line 3 failed: ")
    assert "nowhere" in message
    assert message.endswith("; 1 of 2 statement(s) had completed, all rolled back")
    assert "\n" not in message
    # The first migration, complete, is rolled back with the failed one.
    assert books.state() == before
    assert not {"users", "orders"} & books.tables()
    assert not books.lock_held()
    report = info.value.report
    assert report.committed is False
    assert ran(report) == [
        (USERS.filename, "up", 1),
        (USERS.filename, "up", 2),
        (orders.filename, "up", 1),
    ]


# --- dry run -------------------------------------------------------------------------------------
def test_dry_run_lists_real_changes_and_leaves_the_target_unchanged(books):
    books.target.execute("CREATE TABLE legacy (id integer, old_col text)")
    books.target.execute("CREATE TABLE gone (id integer)")
    books.target.execute("CREATE INDEX gone_id_idx ON gone (id)")
    script = dbmate(
        "20240303000000_reshape.sql",
        "CREATE TABLE fresh (id integer);\n"
        "ALTER TABLE legacy ADD COLUMN note text;\n"
        "CREATE INDEX legacy_note_idx ON legacy (note);\n"
        "ALTER TABLE legacy DROP COLUMN old_col;\n"
        "DROP TABLE gone;",
    )
    before = books.state()
    report, lines = books.run(up(script), dry_run=True)

    assert report.dry_run is True
    assert report.committed is False
    assert kinds(report) == {
        ("table_added", "fresh"),
        ("table_removed", "gone"),
        ("column_added", "legacy.note"),
        ("column_removed", "legacy.old_col"),
        ("index_added", "legacy_note_idx"),
        ("index_removed", "gone_id_idx"),
    }
    assert [c["kind"] for c in report.changes][:2] == ["table_added", "table_removed"]
    assert len(report.statements) == 5
    assert books.state() == before
    assert "fresh" not in books.tables()
    assert not books.lock_held()
    assert "dry run: rolled back; the target is unchanged" in lines


# --- the migration lock --------------------------------------------------------------------------
def test_lock_held_by_someone_else_waits_every_attempt_then_gives_up(books):
    books.take_lock_as_someone_else()
    before = books.state()
    started = time.monotonic()
    with pytest.raises(LockBusy) as info:
        books.run(up(USERS), lock_wait_seconds=1, max_retries=1)
    elapsed = time.monotonic() - started
    assert 1.9 <= elapsed < 4
    message = str(info.value)
    if books.name == "runbook":
        assert message.startswith(f"the migration lock is held by {OTHER_HOLDER} since ")
    else:
        assert message.startswith("the migration lock is held (index=1, is_locked=1)")
    assert message.endswith("gave up after 2 attempt(s) of 1 s: nothing was changed")
    # Nothing ran, and the other holder's lock is still theirs.
    assert books.state() == before
    assert books.lock_held()


def test_lock_freed_during_the_wait_is_taken_and_the_run_succeeds(books):
    books.take_lock_as_someone_else()
    releaser = threading.Timer(0.5, books.release_as_someone_else)
    started = time.monotonic()
    releaser.start()
    try:
        report, lines = books.run(up(USERS), lock_wait_seconds=10)
    finally:
        releaser.join()
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 5
    assert report.committed is True
    assert report.lock_attempts == 1
    assert "users" in books.tables()
    assert USERS.filename in books.names()
    assert not books.lock_held()
    assert lines[0] == "took the migration lock (attempt 1)"


def test_stale_lock_is_refused_at_once(runbook_books):
    books = runbook_books
    books.take_lock_as_someone_else(age=dt.timedelta(minutes=2))
    before = books.state()
    started = time.monotonic()
    with pytest.raises(LockBusy) as info:
        books.run(up(USERS), lock_wait_seconds=60, max_retries=3)
    assert time.monotonic() - started < 1
    assert str(info.value).startswith(f"the migration lock is stale (held by {OTHER_HOLDER} for 12")
    assert str(info.value).endswith(
        "longer than the lock timeout of 60 s): release it first; nothing was changed"
    )
    assert books.state() == before


# --- non-transactional ---------------------------------------------------------------------------
NO_TRANSACTION = dbmate(
    "20240304000000_backfill.sql",
    "CREATE TABLE step_one (id integer);\n"
    "INSERT INTO nowhere (id) VALUES (1);\n"
    "CREATE TABLE step_three (id integer);",
    options="transaction:false",
)
CONCURRENT_INDEX = dbmate(
    "20240305000000_index.sql",
    "CREATE TABLE things (id integer, code text);\n"
    "CREATE INDEX CONCURRENTLY things_code_idx ON things (code);",
    "DROP INDEX CONCURRENTLY things_code_idx;\nDROP TABLE things;",
)


@pytest.mark.parametrize(
    ("script", "why"),
    [
        (NO_TRANSACTION, "is marked to run outside a transaction"),
        (
            CONCURRENT_INDEX,
            "has statements that cannot run in a transaction "
            "(CREATE INDEX CONCURRENTLY things_code_idx ON things (code))",
        ),
    ],
)
def test_non_transactional_script_is_refused_without_the_override(books, script, why):
    before = books.state()
    with pytest.raises(EngineError) as info:
        books.run(up(script))
    assert str(info.value) == (
        f"{script.filename} {why}: a failure half-way could not be rolled back; ask for it "
        "explicitly (--non-transactional) to run it statement by statement"
    )
    assert books.state() == before


def test_create_index_concurrently_runs_with_the_override(pg_books):
    books = pg_books
    report, lines = books.run(up(CONCURRENT_INDEX), allow_non_transactional=True)
    assert report.transactional is False
    assert report.committed is True
    assert ran(report) == [
        (CONCURRENT_INDEX.filename, "up", 1),
        (CONCURRENT_INDEX.filename, "up", 2),
    ]
    assert books.catalog().indexes["things_code_idx"].valid is True
    assert CONCURRENT_INDEX.filename in books.names()
    if books.name == "knex":
        assert books.batches()[CONCURRENT_INDEX.filename] == 3
    assert not books.lock_held()
    assert "outside a transaction" in lines[1]


def test_non_transactional_failure_keeps_what_completed(books):
    before_names = books.names()
    with pytest.raises(StatementFailed) as info:
        books.run(up(NO_TRANSACTION), allow_non_transactional=True)
    message = str(info.value)
    assert message.startswith(f"{NO_TRANSACTION.filename} (up) statement 2 at line 3 failed: ")
    assert message.endswith("; 1 of 3 statement(s) had completed and were NOT rolled back")
    assert info.value.report.transactional is False
    assert ran(info.value.report) == [(NO_TRANSACTION.filename, "up", 1)]
    # Really not rolled back: the first statement's table stays, the third never ran.
    tables = books.tables()
    assert "step_one" in tables
    assert "step_three" not in tables
    assert books.names() == before_names
    assert not books.lock_held()


def test_non_transactional_dry_run_is_refused(books):
    before = books.state()
    with pytest.raises(EngineError, match=r"outside a transaction: it cannot be dry-run$"):
        books.run(up(NO_TRANSACTION), allow_non_transactional=True, dry_run=True)
    assert books.state() == before


def test_non_transactional_with_other_migrations_is_refused(books):
    before = books.state()
    with pytest.raises(EngineError) as info:
        books.run(up(USERS, CONCURRENT_INDEX), allow_non_transactional=True)
    assert str(info.value).endswith(
        ": run it on its own (apply up to version 20240305000000, or the versions before it first)"
    )
    assert str(info.value).startswith(f"{CONCURRENT_INDEX.filename} has statements")
    assert books.state() == before


# --- timeouts and SQL as written -----------------------------------------------------------------
def test_statement_running_past_the_timeout_fails_and_rolls_back_on_postgresql(pg_books):
    books = pg_books
    slow = dbmate(
        "20240306000000_slow.sql", "CREATE TABLE early (id integer);\nSELECT pg_sleep(5);"
    )
    before = books.state()
    started = time.monotonic()
    with pytest.raises(StatementFailed) as info:
        books.run(up(slow), statement_timeout_seconds=0.3)
    assert time.monotonic() - started < 2
    assert str(info.value).startswith(
        f"{slow.filename} (up) statement 2 at line 3 failed: canceling statement due to "
        "statement timeout"
    )
    assert books.state() == before
    assert not books.lock_held()


def test_statement_running_past_the_timeout_fails_and_rolls_back_on_sqlite(sqlite_target):
    books = make_books(sqlite_target, "runbook")
    endless = dbmate(
        "20240306000000_slow.sql",
        "CREATE TABLE early (id integer);\n"
        "INSERT INTO early WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
        "SELECT x FROM c;",
    )
    before = books.state()
    started = time.monotonic()
    with pytest.raises(StatementFailed) as info:
        books.run(up(endless), statement_timeout_seconds=0.3)
    assert time.monotonic() - started < 2
    assert str(info.value).startswith(f"{endless.filename} (up) statement 2 at line 3 failed: ")
    assert "interrupted" in str(info.value)
    assert books.state() == before
    assert not books.lock_held()


def test_literal_percent_in_migration_sql(books):
    script = dbmate(
        "20240307000000_words.sql",
        "CREATE TABLE words (w text);\n"
        "INSERT INTO words VALUES ('apple'), ('banana'), ('100%');\n"
        "CREATE TABLE a_words AS SELECT w FROM words WHERE w LIKE 'a%' OR w LIKE '%\\%' "
        "ESCAPE '\\';",
    )
    report, _ = books.run(up(script))
    assert report.committed is True
    assert sorted(r[0] for r in books.target.query("SELECT w FROM a_words")) == ["100%", "apple"]


# --- mark ----------------------------------------------------------------------------------------
def test_mark_records_and_removes_entries_without_running_sql(books):
    applied = RUNBOOK_APPLIED if books.name == "runbook" else KNEX_APPLIED
    tables = books.tables()
    with books.connect() as conn:
        changes = mark(conn, books.convention, applied=[USERS.filename], removed=[applied[0]])
    assert changes == [
        f"recorded {USERS.filename} as applied (no SQL run)",
        f"removed {applied[0]} from the books (no SQL run)",
    ]
    assert sorted(books.names()) == sorted([applied[1], USERS.filename])
    assert books.tables() == tables  # users was not created
    if books.name == "knex":
        assert books.batches()[USERS.filename] == 3


def test_mark_removing_a_missing_entry_changes_nothing(books):
    before = books.state()
    with books.connect() as conn, pytest.raises(EngineError) as info:
        mark(conn, books.convention, applied=[USERS.filename], removed=["999_missing.sql"])
    assert str(info.value) == "the books have no entry 999_missing.sql: nothing was changed"
    assert books.state() == before  # the entry recorded first is rolled back too


# --- two rollbacks at once -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lock_wait_seconds", "loser_fails_with"),
    [
        # The loser gives up while the winner still holds the lock...
        (0.1, LockBusy),
        # ...or gets it after the winner is done, and finds the entry gone.
        (5, StatementFailed),
    ],
)
def test_two_rollbacks_of_the_same_migration_at_once(pg_books, lock_wait_seconds, loser_fails_with):
    books = pg_books
    widgets = dbmate(
        "20240308000000_widgets.sql",
        "CREATE TABLE widgets (id integer);",
        # IF EXISTS: only the books can stop a second rollback, and they must.
        "SELECT pg_sleep(0.4);\nDROP TABLE IF EXISTS widgets;",
    )
    books.run(up(widgets))
    names_before = books.names()
    start = threading.Barrier(2)
    outcomes: list[object] = [None, None]

    def rollback(slot: int) -> None:
        with books.connect() as conn:
            settings = RunSettings(
                holder=f"worker-{slot}", lock_wait_seconds=lock_wait_seconds, poll_seconds=0.02
            )
            start.wait()
            try:
                steps = [Step("down", widgets, widgets.filename)]
                outcomes[slot] = run(conn, books.convention, steps, settings, lambda _: None)
            except EngineError as error:
                outcomes[slot] = error

    threads = [threading.Thread(target=rollback, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    successes = [o for o in outcomes if not isinstance(o, Exception)]
    failures = [o for o in outcomes if isinstance(o, Exception)]
    assert len(successes) == 1, outcomes
    assert successes[0].committed is True
    assert len(failures) == 1
    assert isinstance(failures[0], loser_fails_with), failures[0]
    if loser_fails_with is StatementFailed:
        assert str(failures[0]) == (
            f"the books have no entry {widgets.filename} to remove: rolled back"
        )
    # Rolled back exactly once: the table and the entry are gone, the rest of the books kept.
    assert "widgets" not in books.tables()
    assert books.names() == [n for n in names_before if n != widgets.filename]
    assert not books.lock_held()


# --- repairing the lock table --------------------------------------------------------------------
def repair(books: Books, *, release: bool) -> list[str]:
    with books.connect() as conn:
        return books.convention.repair_lock_table(conn, release=release)


def test_runbook_repair_removes_extra_rows_and_keeps_a_lock_that_is_not_stale(runbook_books):
    books = runbook_books
    books.take_lock_as_someone_else()
    books.target.execute("INSERT INTO migration_lock (id, locked_by) VALUES (2, 'ghost')")
    books.target.execute("INSERT INTO migration_lock (id, locked_by) VALUES (3, NULL)")
    changes = repair(books, release=False)
    assert len(changes) == 1
    assert changes[0].startswith("removed 2 extra lock row(s): id=2, locked_by=ghost")
    assert books.lock_rows() == [(1, OTHER_HOLDER)]


def test_runbook_repair_releases_a_stale_lock(runbook_books):
    books = runbook_books
    books.take_lock_as_someone_else(age=dt.timedelta(hours=1))
    books.target.execute("INSERT INTO migration_lock (id, locked_by) VALUES (2, 'ghost')")
    changes = repair(books, release=True)
    assert changes[0].startswith("removed 1 extra lock row(s): id=2, locked_by=ghost")
    assert changes[1].startswith(f"removed the stale lock row: id=1, locked_by={OTHER_HOLDER}")
    assert len(changes) == 2
    assert books.lock_rows() == []


def test_runbook_repair_without_release_never_frees_a_held_lock(runbook_books):
    # A lock held only by a row without id 1 is still held: the runbook's migrator waits
    # while any row exists. Tidying the table must not release a lock that is not stale.
    books = runbook_books
    books.target.execute("INSERT INTO migration_lock (id, locked_by) VALUES (2, 'deploy-2')")
    changes = repair(books, release=False)
    assert books.lock_held()
    assert books.lock_rows() == [(2, "deploy-2")]
    assert changes == []


def test_repair_of_a_well_formed_free_lock_changes_nothing(books):
    before = books.lock_rows()
    assert repair(books, release=True) == []
    assert books.lock_rows() == before


@pytest.fixture
def knex_books(any_target):
    return make_books(any_target, "knex")


def test_knex_repair_inserts_the_missing_row(knex_books):
    books = knex_books
    books.target.execute("DELETE FROM knex_migrations_lock")
    assert repair(books, release=False) == ["inserted the missing lock row (is_locked = 0)"]
    assert [is_locked for _, is_locked in books.lock_rows()] == [0]
    # And the runner can take and release the lock again.
    report, _ = books.run(up(USERS))
    assert report.committed is True
    assert [is_locked for _, is_locked in books.lock_rows()] == [0]


def test_knex_repair_removes_extra_rows(knex_books):
    books = knex_books
    books.target.execute("INSERT INTO knex_migrations_lock (is_locked) VALUES (0)")
    books.target.execute("INSERT INTO knex_migrations_lock (is_locked) VALUES (0)")
    (first, _), *_ = books.lock_rows()
    changes = repair(books, release=False)
    assert len(changes) == 1
    assert changes[0].startswith("removed 2 extra lock row(s): index=")
    assert books.lock_rows() == [(first, 0)]


def test_knex_repair_releases_a_stale_lock(knex_books):
    books = knex_books
    books.take_lock_as_someone_else()
    assert repair(books, release=True) == ["released the stale lock (is_locked = 0)"]
    assert not books.lock_held()


def test_knex_repair_without_release_keeps_the_lock_held(knex_books):
    # The extra row is the one that holds the lock: it is the one kept.
    books = knex_books
    books.target.execute("INSERT INTO knex_migrations_lock (is_locked) VALUES (1)")
    (free, _), (held, _) = books.lock_rows()
    changes = repair(books, release=False)
    assert changes == [f"removed 1 extra lock row(s): index={free}, is_locked=0"]
    assert books.lock_rows() == [(held, 1)]


def test_knex_repair_with_release_removes_extras_and_frees_the_lock(knex_books):
    books = knex_books
    books.target.execute("INSERT INTO knex_migrations_lock (is_locked) VALUES (1)")
    changes = repair(books, release=True)
    assert changes[0].startswith("removed 1 extra lock row(s): index=")
    assert changes[1:] == ["released the stale lock (is_locked = 0)"]
    assert [is_locked for _, is_locked in books.lock_rows()] == [0]


def test_repair_never_releases_a_lock_retaken_since_it_was_judged_stale(runbook_books):
    """Cleanup judges staleness from a read; a new holder in between keeps its lock."""
    books = runbook_books
    books.target.take_runbook_lock(lock_age=dt.timedelta(hours=1), locked_by="crashed deploy")
    with books.connect() as conn:
        judged = books.convention.read_lock(conn).rows
    books.target.execute("DELETE FROM migration_lock")
    books.take_lock_as_someone_else()
    with books.connect() as conn:
        changes = books.convention.repair_lock_table(conn, release=True, expected_rows=judged)
    assert changes == ["the lock changed since it was found stale: left alone"]
    assert books.lock_rows() == [(1, OTHER_HOLDER)]
