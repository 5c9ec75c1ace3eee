"""Planning, pure: which scripts are pending, which entry a rollback takes, what verify finds."""

import datetime as dt

import pytest

from migrations_ops.engine import AppliedMigration, parse_directory, parse_file
from migrations_ops.engine.plan import (
    PlanError,
    Problem,
    latest_applied,
    lock_problem,
    pending,
    rollback_choice,
    script_for,
    verify_books,
    version_of,
)

UTC = dt.UTC
T0 = dt.datetime(2024, 1, 1, tzinfo=UTC)


def script(filename, *, down="DROP TABLE t;"):
    text = f"-- migrate:up\nCREATE TABLE t_{filename.split('_')[0]} (id int);\n"
    if down is not None:
        text += f"-- migrate:down\n{down}\n"
    return parse_file(filename, text)


def books(*names):
    """Book entries recorded in this order, a minute apart."""
    return [
        AppliedMigration(name, T0 + dt.timedelta(minutes=index), index + 1)
        for index, name in enumerate(names)
    ]


def filenames(scripts):
    return [s.filename for s in scripts]


def codes(problems):
    return [(p.code, p.message) for p in problems]


S1, S2, S3 = script("001_users.sql"), script("002_email.sql"), script("003_orders.sql")
S10 = script("10_late.sql")


# --- version_of ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("001_users.sql", "001"),
        ("003_x.up.sql", "003"),
        ("20240101000000_init.js", "20240101000000"),
        ("init.js", None),
        ("v1_init.sql", None),
    ],
)
def test_version_of(name, version):
    assert version_of(name) == version


# --- pending -------------------------------------------------------------------------------------
def test_pending_orders_by_numeric_version_not_text():
    # As text "10" < "2"; as numbers 2 < 10.
    s2 = script("2_two.sql")
    assert filenames(pending([], [S10, s2, S3])) == ["2_two.sql", "003_orders.sql", "10_late.sql"]


def test_pending_leaves_out_applied_ones():
    assert filenames(pending(books("001_users.sql"), [S3, S1, S2])) == [
        "002_email.sql",
        "003_orders.sql",
    ]


def test_nothing_pending_when_all_applied():
    assert pending(books("001_users.sql", "002_email.sql"), [S1, S2]) == []


def test_pending_up_to_a_version_includes_it_and_stops_there():
    assert filenames(pending(books("001_users.sql"), [S1, S2, S3, S10], "003")) == [
        "002_email.sql",
        "003_orders.sql",
    ]
    assert filenames(pending([], [S1, S2, S3], "001")) == ["001_users.sql"]


def test_pending_up_to_an_applied_version_is_only_the_older_pending_ones():
    # 002 is applied already: only what is pending up to it (001, skipped earlier) remains.
    assert filenames(pending(books("002_email.sql"), [S1, S2, S3], "002")) == ["001_users.sql"]


def test_pending_up_to_an_unknown_version_lists_the_known_ones():
    with pytest.raises(PlanError, match=r"^unknown version 7: known versions: 001, 002, 003$"):
        pending([], [S3, S1, S2], "7")


def test_pending_up_to_a_version_with_no_scripts():
    with pytest.raises(PlanError, match="unknown version 1: no scripts are imported"):
        pending([], [], "1")


def test_pending_unknown_version_lists_at_most_ten():
    many = [script(f"{n:03d}_m.sql") for n in range(1, 13)]
    with pytest.raises(PlanError) as info:
        pending([], many, "99")
    assert str(info.value) == (
        "unknown version 99: known versions: 001, 002, 003, 004, 005, 006, 007, 008, 009, 010 …"
    )


def test_book_entries_match_scripts_by_version_prefix_whatever_the_filename(tmp_path):
    # The books say "003_x.sql" (as another tool wrote it); the imported folder is paired.
    (tmp_path / "003_x.up.sql").write_text("CREATE TABLE x (id int);\n")
    (tmp_path / "003_x.down.sql").write_text("DROP TABLE x;\n")
    (tmp_path / "004_y.up.sql").write_text("CREATE TABLE y (id int);\n")
    paired = parse_directory(tmp_path)
    assert filenames(paired) == ["003_x.up.sql", "004_y.up.sql"]
    applied = books("003_x.sql")
    assert filenames(pending(applied, paired)) == ["004_y.up.sql"]
    assert script_for(applied[0], paired) is paired[0]
    entry, chosen = rollback_choice(applied, paired)
    assert (entry.name, chosen.filename) == ("003_x.sql", "003_x.up.sql")
    assert verify_books(applied, paired) == [Problem("pending", "004_y.up.sql is pending")]


def test_knex_style_book_names_match_sql_scripts():
    init = script("20240101000000_init.sql")
    orders = script("20240201000000_orders.sql")
    later = script("20240301000000_invoices.sql")
    applied = books("20240101000000_init.js", "20240201000000_orders.js")
    assert filenames(pending(applied, [later, orders, init])) == ["20240301000000_invoices.sql"]
    assert verify_books(applied, [init, orders, later]) == [
        Problem("pending", "20240301000000_invoices.sql is pending")
    ]
    entry, chosen = rollback_choice(applied, [init, orders, later])
    assert (entry.name, chosen) == ("20240201000000_orders.js", orders)


def test_a_book_entry_without_version_matches_no_versioned_script():
    # "users.js" names no version: it is compared by name, and "001_users" is another name.
    applied = books("users.js")
    assert script_for(applied[0], [S1]) is None
    assert pending(applied, [S1]) == [S1]
    assert codes(verify_books(applied, [S1])) == [
        ("applied_unknown", "users.js is applied but no script is known for it"),
        ("pending", "001_users.sql is pending"),
    ]


# --- latest_applied ------------------------------------------------------------------------------
def test_latest_applied_is_the_highest_version_not_the_last_recorded():
    applied = books("001_users.sql", "003_orders.sql", "002_email.sql")
    assert latest_applied(applied).name == "003_orders.sql"


def test_latest_applied_compares_versions_as_numbers():
    assert latest_applied(books("10_late.sql", "9_nine.sql")).name == "10_late.sql"


def test_latest_applied_without_versions_is_the_last_recorded():
    assert latest_applied(books("init.js", "users.js")).name == "users.js"


def test_latest_applied_of_empty_books():
    assert latest_applied([]) is None


# --- rollback_choice -----------------------------------------------------------------------------
def test_rollback_takes_the_latest_applied_by_default():
    applied = books("001_users.sql", "002_email.sql")
    entry, chosen = rollback_choice(applied, [S1, S2, S3])
    assert entry is applied[1]
    assert chosen is S2


def test_rollback_of_the_latest_by_its_version():
    applied = books("001_users.sql", "002_email.sql")
    entry, chosen = rollback_choice(applied, [S1, S2], "002")
    assert (entry.name, chosen) == ("002_email.sql", S2)


def test_rollback_of_an_older_one_needs_out_of_order():
    applied = books("001_users.sql", "002_email.sql")
    with pytest.raises(PlanError) as info:
        rollback_choice(applied, [S1, S2], "001")
    assert str(info.value) == (
        "001_users.sql is not the latest applied migration (002_email.sql): rolling back an "
        "older one needs the explicit out-of-order override"
    )
    entry, chosen = rollback_choice(applied, [S1, S2], "001", out_of_order=True)
    assert (entry.name, chosen) == ("001_users.sql", S1)


def test_rollback_of_a_version_not_applied():
    applied = books("001_users.sql", "002_email.sql")
    with pytest.raises(PlanError) as info:
        rollback_choice(applied, [S1, S2, S3], "003", out_of_order=True)
    assert str(info.value) == (
        "version 003 is not applied (latest applied: 001_users.sql, 002_email.sql)"
    )


def test_rollback_with_nothing_applied():
    with pytest.raises(PlanError, match="no migration is applied: there is nothing to roll back"):
        rollback_choice([], [S1])


def test_rollback_without_the_script_imported():
    applied = books("001_users.sql", "002_email.sql")
    with pytest.raises(PlanError) as info:
        rollback_choice(applied, [S1])
    assert str(info.value) == (
        "no script is imported for 002_email.sql: import the application's migrations folder "
        "first (ops import)"
    )


@pytest.mark.parametrize("down", [None, "-- nothing to undo"])
def test_rollback_of_a_script_without_down_sql(down):
    no_down = script("002_email.sql", down=down)
    assert no_down.down_sql.strip() == ("" if down is None else down)
    applied = books("001_users.sql", "002_email.sql")
    if down is None:
        with pytest.raises(PlanError, match=r"^002_email.sql has no down SQL: it cannot be"):
            rollback_choice(applied, [S1, no_down])
    else:
        # A comment is down SQL that does nothing: the choice is allowed, and it has no
        # statement to run.
        _, chosen = rollback_choice(applied, [S1, no_down])
        assert chosen.down_statements == ()


# --- verify_books --------------------------------------------------------------------------------
def test_verify_clean_books_finds_nothing():
    assert verify_books(books("001_users.sql", "002_email.sql"), [S1, S2]) == []


def test_verify_applied_but_unknown():
    problems = verify_books(books("001_users.sql", "002_email.sql", "005_ghost.sql"), [S1, S2])
    assert codes(problems) == [
        ("applied_unknown", "005_ghost.sql is applied but no script is known for it")
    ]


def test_verify_pending_in_version_order():
    problems = verify_books(books("001_users.sql"), [S10, S3, S1, S2])
    assert codes(problems) == [
        ("pending", "002_email.sql is pending"),
        ("pending", "003_orders.sql is pending"),
        ("pending", "10_late.sql is pending"),
    ]


def test_verify_changed_since_applied():
    drifted = {"002_email.sql": "checksum abc differs", "003_orders.sql": "pending anyway"}
    problems = verify_books(books("001_users.sql", "002_email.sql"), [S1, S2, S3], drifted=drifted)
    assert codes(problems) == [
        ("changed", "002_email.sql changed since it was applied: checksum abc differs"),
        ("pending", "003_orders.sql is pending"),
    ]


def test_verify_pending_older_than_the_latest_applied_is_out_of_order():
    problems = verify_books(books("001_users.sql", "003_orders.sql"), [S1, S2, S3])
    assert codes(problems) == [
        ("pending", "002_email.sql is pending"),
        (
            "out_of_order",
            "002_email.sql is pending but older than the applied 003_orders.sql: it would run "
            "out of order",
        ),
    ]


def test_verify_applied_in_an_order_the_versions_contradict():
    problems = verify_books(books("001_users.sql", "003_orders.sql", "002_email.sql"), [S1, S2, S3])
    assert codes(problems) == [
        ("out_of_order", "002_email.sql was applied after the newer 003_orders.sql")
    ]


def test_verify_everything_at_once():
    applied = books("002_email.sql", "001_users.sql", "009_gone.sql")
    problems = verify_books(applied, [S1, S2, S3, S10], drifted={"001_users.sql": "edited"})
    assert sorted(p.code for p in problems) == [
        "applied_unknown",
        "changed",
        "out_of_order",
        "out_of_order",
        "pending",
        "pending",
    ]
    assert Problem("out_of_order", "001_users.sql was applied after the newer 002_email.sql") in (
        problems
    )
    assert (
        Problem(
            "out_of_order",
            "003_orders.sql is pending but older than the applied 009_gone.sql: it would run "
            "out of order",
        )
        in problems
    )
    assert problems[0].as_dict() == {
        "code": "applied_unknown",
        "message": "009_gone.sql is applied but no script is known for it",
    }


# --- lock_problem --------------------------------------------------------------------------------
NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TIMEOUT = dt.timedelta(minutes=15)


def test_lock_held_longer_than_the_timeout_is_stale():
    problem = lock_problem(True, NOW - dt.timedelta(minutes=20), NOW, TIMEOUT)
    assert problem == Problem(
        "stale_lock",
        "the migration lock has been held for 1200 s, longer than the lock timeout (900 s)",
    )


@pytest.mark.parametrize(
    ("held", "since"),
    [
        (True, NOW - TIMEOUT),  # exactly the timeout: not yet stale
        (True, NOW - dt.timedelta(minutes=1)),
        (True, None),  # no time known
        (False, NOW - dt.timedelta(days=1)),  # a released lock's old time
    ],
)
def test_lock_not_stale(held, since):
    assert lock_problem(held, since, NOW, TIMEOUT) is None
