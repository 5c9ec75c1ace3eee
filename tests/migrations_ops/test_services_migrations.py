"""Import, apply, rollback, dry run, mark, verify, cleanup through the services."""

import datetime as dt
import threading
import time
from functools import partial

import pytest
from django.db import connection as console_connection
from django.test.utils import CaptureQueriesContext

from incidents.models import IncidentStatus
from migrations_ops import engine, services
from migrations_ops.actors import Actor
from migrations_ops.models import (
    AuditEvent,
    Door,
    Environment,
    LockObservation,
    MigrationScript,
    Operation,
    OperationStatus,
)
from tests.factories import IncidentFactory, TargetFactory, UserFactory
from tests.scripts_folder import EMAIL, ORDERS, USERS, apply_directly, write_folder

pytestmark = pytest.mark.django_db

OPERATOR = Actor.shell_operator()


def catalog_of(target_db):
    with engine.connect(target_db.url, schema=target_db.schema) as connection:
        return engine.snapshot(connection)


def books_of(target_db):
    return [row[0] for row in target_db.query("SELECT filename FROM migrations ORDER BY filename")]


def run(operation):
    """Run the operation's task body in this process, as the worker would."""
    return services.execute_operation(operation.pk, worker="test-worker")


@pytest.fixture
def runbook_target(any_target, tmp_path):
    """Books with 001 and 002 applied (their SQL really run), 003 pending in the folder."""
    any_target.create_runbook_books()
    apply_directly(any_target, USERS, EMAIL)
    target = TargetFactory(db=any_target, name="orders", lock_timeout_seconds=2, max_retries=0)
    services.import_scripts(
        actor=OPERATOR, target=target, directory=write_folder(tmp_path / "m", USERS, EMAIL, ORDERS)
    )
    target.db = any_target
    target.folder = tmp_path / "m"
    return target


# --- import ------------------------------------------------------------------------------------
def test_import_stores_scripts_and_reports_drift_of_applied_ones(runbook_target):
    folder = runbook_target.folder
    assert list(runbook_target.scripts.values_list("version", flat=True)) == ["001", "002", "003"]
    email = MigrationScript.objects.get(target=runbook_target, version="002")
    original_checksum = email.checksum

    changed_email = (EMAIL[0], "ALTER TABLE users ADD COLUMN email VARCHAR(320);", EMAIL[2])
    changed_orders = (ORDERS[0], ORDERS[1] + "\nCREATE INDEX orders_id ON orders (id);", ORDERS[2])
    write_folder(folder, USERS, changed_email, changed_orders)
    report = services.import_scripts(actor=OPERATOR, target=runbook_target, directory=folder)

    assert report.drift == ["002_add_email.sql"]  # applied: its SQL is not replaced
    assert report.updated == ["003_create_orders.sql"]  # pending: replaced
    assert report.unchanged == ["001_create_users.sql"]
    email.refresh_from_db()
    assert email.checksum == original_checksum
    assert "VARCHAR" not in email.up_sql
    assert email.drift_checksum and email.drift_checksum != original_checksum
    event = AuditEvent.objects.filter(action="scripts.imported").latest("id")
    assert event.details["drift"] == ["002_add_email.sql"]


def test_line_endings_do_not_count_as_a_change(runbook_target):
    for path in runbook_target.folder.glob("*.sql"):
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    report = services.import_scripts(
        actor=OPERATOR, target=runbook_target, directory=runbook_target.folder
    )
    assert len(report.unchanged) == 3 and not report.drift and not report.updated


def test_a_reverted_migration_leaves_the_store_unless_applied(runbook_target):
    write_folder(runbook_target.folder, USERS)
    report = services.import_scripts(
        actor=OPERATOR, target=runbook_target, directory=runbook_target.folder
    )
    assert report.removed == ["003_create_orders.sql"]
    assert report.missing == ["002_add_email.sql"]
    assert list(runbook_target.scripts.values_list("version", flat=True)) == ["001", "002"]


def test_an_unparsable_folder_stores_nothing(runbook_target):
    (runbook_target.folder / "004_broken.sql").write_text("-- migrate:down\nDROP TABLE x;\n")
    (runbook_target.folder / "005_new.sql").write_text("-- migrate:up\nCREATE TABLE y (a int);\n")
    with pytest.raises(services.InvalidRequest, match=r"004_broken\.sql:1: "):
        services.import_scripts(
            actor=OPERATOR, target=runbook_target, directory=runbook_target.folder
        )
    assert runbook_target.scripts.count() == 3


# --- apply -------------------------------------------------------------------------------------
def test_apply_runs_pending_migrations_and_records_them(runbook_target):
    before = catalog_of(runbook_target.db)
    operation = services.request_apply(actor=OPERATOR, target=runbook_target, reason="release 42")
    assert operation.params["migrations"] == ["003_create_orders.sql"]
    operation = run(operation)

    assert operation.status == OperationStatus.SUCCEEDED, operation.error
    assert "orders" in catalog_of(runbook_target.db).tables
    assert "orders" not in before.tables
    assert books_of(runbook_target.db)[-1] == "003_create_orders.sql"
    assert runbook_target.db.runbook_lock_rows() == []
    assert operation.result["changes"] == []  # measured by dry runs only
    assert [s["line"] for s in operation.result["statements"]] == [2, 3]


def test_dry_run_reports_real_effects_and_changes_nothing(runbook_target):
    before = catalog_of(runbook_target.db)
    operation = run(services.request_apply(actor=OPERATOR, target=runbook_target, dry_run=True))
    assert operation.status == OperationStatus.SUCCEEDED
    assert operation.result["dry_run"] is True and operation.result["committed"] is False
    assert {"kind": "table_added", "object": "orders"}.items() <= operation.result["changes"][
        0
    ].items()
    assert catalog_of(runbook_target.db) == before
    assert "003_create_orders.sql" not in books_of(runbook_target.db)
    assert operation.reason == "dry run"


def test_nothing_to_apply_and_unknown_versions_are_refused(runbook_target):
    with pytest.raises(services.ServiceError, match="unknown version 009: known versions: 001"):
        services.request_apply(actor=OPERATOR, target=runbook_target, reason="x", to_version="009")
    run(services.request_apply(actor=OPERATOR, target=runbook_target, reason="x"))
    with pytest.raises(services.ServiceError, match="nothing to apply"):
        services.request_apply(actor=OPERATOR, target=runbook_target, reason="x")


def test_a_request_records_the_lock_it_saw_whether_it_goes_on_or_is_refused(runbook_target):
    # The console last saw the lock held; it has been released since.
    runbook_target.db.take_runbook_lock(locked_by="deploy-1")
    services.read_target_status(runbook_target)
    runbook_target.db.execute("DELETE FROM migration_lock")

    with pytest.raises(services.ServiceError, match="unknown version 009"):
        services.request_apply(actor=OPERATOR, target=runbook_target, reason="x", to_version="009")
    refused = LockObservation.objects.get(target=runbook_target)

    with CaptureQueriesContext(console_connection) as queries:
        operation = services.request_apply(actor=OPERATOR, target=runbook_target, reason="x")
    requested = LockObservation.objects.get(target=runbook_target)

    assert (refused.held, refused.holder) == (False, "")
    assert requested.held is False and requested.observed_at > refused.observed_at
    # Written in the transaction that writes the operation: no commit of its own.
    writes = [q["sql"] for q in queries.captured_queries if "lockobservation" in q["sql"]]
    statements = [q["sql"] for q in queries.captured_queries]
    assert len(writes) == 1
    assert statements.index(writes[0]) > statements.index(
        next(sql for sql in statements if sql.startswith('INSERT INTO "migrations_ops_operation"'))
    )
    assert Operation.objects.get(pk=operation.pk).status == OperationStatus.QUEUED


def test_knex_targets_need_sql_scripts(sqlite_target):
    sqlite_target.create_knex_books()
    target = TargetFactory(db=sqlite_target, convention="knex")
    with pytest.raises(services.ServiceError, match="uses Knex, whose migrations are JavaScript"):
        services.request_apply(actor=OPERATOR, target=target, reason="x")
    with pytest.raises(services.ServiceError, match="uses Knex, whose migrations are JavaScript"):
        services.request_rollback(actor=OPERATOR, target=target, reason="x")


def test_a_failing_apply_leaves_the_target_exactly_as_before(runbook_target):
    broken = (ORDERS[0], ORDERS[1] + "\nINSERT INTO nowhere VALUES (1);", ORDERS[2])
    write_folder(runbook_target.folder, USERS, EMAIL, broken)
    services.import_scripts(actor=OPERATOR, target=runbook_target, directory=runbook_target.folder)
    before = catalog_of(runbook_target.db)

    operation = run(services.request_apply(actor=OPERATOR, target=runbook_target, reason="x"))

    assert operation.status == OperationStatus.FAILED
    assert "003_create_orders.sql (up) statement 3 at line 4 failed" in operation.error
    assert "nowhere" in operation.error
    assert len(operation.result["statements"]) == 2  # what ran before the failure
    assert catalog_of(runbook_target.db) == before
    assert "003_create_orders.sql" not in books_of(runbook_target.db)
    assert runbook_target.db.runbook_lock_rows() == []


# --- rollback ----------------------------------------------------------------------------------
def test_rollback_of_the_latest_migration(runbook_target):
    operation = run(
        services.request_rollback(actor=OPERATOR, target=runbook_target, reason="bad column")
    )
    assert operation.status == OperationStatus.SUCCEEDED, operation.error
    assert operation.params["book_name"] == "002_add_email.sql"
    columns = [c.name for c in catalog_of(runbook_target.db).tables["users"]]
    assert "email" not in columns
    assert books_of(runbook_target.db) == ["001_create_users.sql"]
    assert runbook_target.db.runbook_lock_rows() == []


def test_rollback_rules(runbook_target):
    with pytest.raises(services.InvalidRequest, match="a reason is required"):
        services.request_rollback(actor=OPERATOR, target=runbook_target, reason=" ")
    with pytest.raises(services.ServiceError, match="needs the explicit out-of-order override"):
        services.request_rollback(actor=OPERATOR, target=runbook_target, reason="x", version="001")
    with pytest.raises(services.ServiceError, match="version 003 is not applied"):
        services.request_rollback(actor=OPERATOR, target=runbook_target, reason="x", version="003")
    operation = run(
        services.request_rollback(
            actor=OPERATOR, target=runbook_target, reason="x", version="001", out_of_order=True
        )
    )
    assert operation.status == OperationStatus.SUCCEEDED, operation.error
    assert books_of(runbook_target.db) == ["002_add_email.sql"]


def test_rollback_of_a_script_without_down_sql_is_refused_at_the_request(runbook_target):
    no_down = (ORDERS[0], ORDERS[1], None)
    write_folder(runbook_target.folder, USERS, EMAIL, no_down)
    services.import_scripts(actor=OPERATOR, target=runbook_target, directory=runbook_target.folder)
    # Planning reads the scripts without their SQL: the summary still knows there is none.
    summaries = {s.version: s.has_down_sql for s in services.script_summaries(runbook_target)}
    assert summaries == {"001": True, "002": True, "003": False}
    applied = run(services.request_apply(actor=OPERATOR, target=runbook_target, reason="x"))
    assert applied.status == OperationStatus.SUCCEEDED, applied.error
    with pytest.raises(services.ServiceError, match=r"^003_create_orders.sql has no down SQL"):
        services.request_rollback(actor=OPERATOR, target=runbook_target, reason="x")
    assert not Operation.objects.filter(kind="rollback").exists()


def test_rollback_refused_when_the_books_changed_since_the_request(runbook_target):
    operation = services.request_rollback(actor=OPERATOR, target=runbook_target, reason="x")
    runbook_target.db.execute("DELETE FROM migrations WHERE filename = '002_add_email.sql'")
    operation = run(operation)
    assert operation.status == OperationStatus.FAILED
    assert "the books changed since the request" in operation.error


def test_books_changed_while_waiting_for_the_lock_are_seen_once_it_is_taken(runbook_target):
    """The application's migrator holds the lock, rolls 002 back itself and lets go: the
    console, which asked to roll back 002 and was waiting, must not run its SQL on the books as
    they are now (they are read again under the lock)."""
    runbook_target.db.take_runbook_lock(locked_by="app-migrator pid 77")
    operation = services.request_rollback(actor=OPERATOR, target=runbook_target, reason="x")

    def migrator_rolls_back_then_releases():
        time.sleep(0.5)
        runbook_target.db.execute("ALTER TABLE users DROP COLUMN email")
        runbook_target.db.execute("DELETE FROM migrations WHERE filename = '002_add_email.sql'")
        runbook_target.db.execute("DELETE FROM migration_lock")

    migrator = threading.Thread(target=migrator_rolls_back_then_releases)
    migrator.start()
    try:
        operation = run(operation)
    finally:
        migrator.join()
    assert operation.status == OperationStatus.FAILED
    assert "the books changed since the request" in operation.error
    assert "took the migration lock" in operation.log
    assert books_of(runbook_target.db) == ["001_create_users.sql"]
    assert runbook_target.db.runbook_lock_rows() == []


def test_a_lock_held_by_someone_else_makes_the_operation_wait_then_fail(runbook_target):
    runbook_target.db.take_runbook_lock(locked_by="app-migrator pid 77")
    operation = services.request_rollback(actor=OPERATOR, target=runbook_target, reason="x")
    before = catalog_of(runbook_target.db)
    operation = run(operation)
    assert operation.status == OperationStatus.FAILED
    assert "held by app-migrator pid 77" in operation.error
    assert catalog_of(runbook_target.db) == before
    assert runbook_target.db.runbook_lock_rows() == [(1, "app-migrator pid 77")]


def test_a_stale_lock_is_refused_at_request_time(runbook_target):
    runbook_target.db.take_runbook_lock(lock_age=dt.timedelta(minutes=5), locked_by="crashed")
    with pytest.raises(services.ServiceError, match=r"is stale .* force-release it first"):
        services.request_rollback(actor=OPERATOR, target=runbook_target, reason="x")


def test_permissions_split_dry_runs_from_real_runs(runbook_target):
    reviewer = UserFactory(
        permissions=["migrations_ops.view_target", "migrations_ops.dry_run_migrations"]
    )
    actor = Actor.for_user(reviewer, Door.API)
    assert services.request_apply(actor=actor, target=runbook_target, dry_run=True)
    Operation.objects.all().delete()
    with pytest.raises(services.PermissionDenied, match="not allowed to apply migrations"):
        services.request_apply(actor=actor, target=runbook_target, reason="x")
    with pytest.raises(services.PermissionDenied, match="not allowed to roll back"):
        services.request_rollback(actor=actor, target=runbook_target, reason="x")
    with pytest.raises(services.PermissionDenied, match="not allowed to fix the books"):
        services.request_mark(
            actor=actor, target=runbook_target, version="003", reason="x", applied=True
        )


def test_production_operations_need_the_typed_name(runbook_target):
    runbook_target.environment = Environment.PRODUCTION
    runbook_target.save()
    with pytest.raises(services.InvalidRequest, match="production target: type its name"):
        services.request_rollback(actor=OPERATOR, target=runbook_target, reason="x")
    assert services.request_rollback(
        actor=OPERATOR, target=runbook_target, reason="x", confirm_name="orders"
    )


# --- fixing the books, verify, cleanup ---------------------------------------------------------
def test_mark_applied_and_rolled_back_change_only_the_books(runbook_target):
    before = catalog_of(runbook_target.db)
    marked = run(
        services.request_mark(
            actor=OPERATOR, target=runbook_target, version="003", reason="ran by hand", applied=True
        )
    )
    assert marked.status == OperationStatus.SUCCEEDED, marked.error
    assert books_of(runbook_target.db)[-1] == "003_create_orders.sql"
    assert [m["name"] for m in marked.result["after"]][-1] == "003_create_orders.sql"
    assert len(marked.result["after"]) == len(marked.result["before"]) + 1
    unmarked = run(
        services.request_mark(
            actor=OPERATOR, target=runbook_target, version="003", reason="undo", applied=False
        )
    )
    assert unmarked.status == OperationStatus.SUCCEEDED
    assert "003_create_orders.sql" not in books_of(runbook_target.db)
    assert catalog_of(runbook_target.db) == before
    with pytest.raises(services.ServiceError, match="not recorded as applied"):
        services.request_mark(
            actor=OPERATOR, target=runbook_target, version="003", reason="x", applied=False
        )


def test_verify_names_every_problem(runbook_target):
    runbook_target.db.execute(
        "INSERT INTO migrations (filename, applied_at) VALUES ('000_legacy.sql', CURRENT_TIMESTAMP)"
    )
    operation = run(services.request_verify(actor=OPERATOR, target=runbook_target))
    codes = sorted(p["code"] for p in operation.result["problems"])
    assert codes == ["applied_unknown", "out_of_order", "pending"]
    assert operation.result["ok"] is False

    runbook_target.db.execute("DELETE FROM migrations WHERE filename = '000_legacy.sql'")
    run(services.request_apply(actor=OPERATOR, target=runbook_target, reason="x"))
    assert run(services.request_verify(actor=OPERATOR, target=runbook_target)).result["ok"]


def test_verify_finds_invalid_indexes_and_stale_locks(pg_target, tmp_path):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=10))
    apply_directly(pg_target, USERS, EMAIL)
    pg_target.execute("INSERT INTO users (id, name) VALUES (1, 'a'), (2, 'a')")
    with pytest.raises(Exception, match="could not create unique index"):
        pg_target.execute("CREATE UNIQUE INDEX CONCURRENTLY users_name ON users (name)")
    target = TargetFactory(db=pg_target)
    services.import_scripts(
        actor=OPERATOR, target=target, directory=write_folder(tmp_path, USERS, EMAIL)
    )
    problems = run(services.request_verify(actor=OPERATOR, target=target)).result["problems"]
    assert sorted(p["code"] for p in problems) == ["invalid_index", "stale_lock"]
    assert any("users_name" in p["message"] for p in problems)


def test_verify_reports_drift(runbook_target):
    write_folder(
        runbook_target.folder, USERS, (EMAIL[0], "ALTER TABLE users ADD COLUMN e TEXT;", ""), ORDERS
    )
    services.import_scripts(actor=OPERATOR, target=runbook_target, directory=runbook_target.folder)
    problems = run(services.request_verify(actor=OPERATOR, target=runbook_target)).result[
        "problems"
    ]
    changed = [p for p in problems if p["code"] == "changed"]
    assert (
        len(changed) == 1
        and "002_add_email.sql changed since it was applied" in changed[0]["message"]
    )


def test_cleanup_removes_a_stale_lock_and_leaves_a_fresh_one(runbook_target):
    runbook_target.db.take_runbook_lock(lock_age=dt.timedelta(minutes=5), locked_by="crashed")
    runbook_target.db.execute("INSERT INTO migration_lock (id, locked_by) VALUES (2, 'dup')")
    operation = run(services.request_cleanup(actor=OPERATOR, target=runbook_target, reason="x"))
    assert operation.status == OperationStatus.SUCCEEDED, operation.error
    assert runbook_target.db.runbook_lock_rows() == []
    assert len(operation.result["changes"]) == 2

    runbook_target.db.take_runbook_lock(locked_by="live deploy")
    operation = run(services.request_cleanup(actor=OPERATOR, target=runbook_target, reason="x"))
    assert runbook_target.db.runbook_lock_rows() == [(1, "live deploy")]
    assert operation.result["changes"] == ["the lock is held but not stale: left alone"]


# --- the incident an operation serves ------------------------------------------------------------
REQUESTS = {
    "apply": partial(services.request_apply, reason="release 9"),
    "dry-run rollback": partial(services.request_rollback, reason="", dry_run=True),
    "mark": partial(services.request_mark, version="003", applied=True, reason="by hand"),
    "verify": services.request_verify,
    "cleanup": partial(services.request_cleanup, reason="tidy"),
}


@pytest.mark.parametrize("kind", REQUESTS)
def test_every_request_serves_an_incident_but_never_a_closed_one(runbook_target, kind):
    request = partial(REQUESTS[kind], actor=OPERATOR, target=runbook_target)
    closed = IncidentFactory(status=IncidentStatus.CLOSED)

    with pytest.raises(
        services.InvalidRequest,
        match=rf"^incident #{closed.pk} is closed: operations can no longer be linked to it$",
    ):
        request(incident=closed)
    assert not Operation.objects.exists()
    assert not AuditEvent.objects.filter(action="operation.requested").exists()

    # Any incident not closed may be served, open or not.
    resolved = IncidentFactory(status=IncidentStatus.RESOLVED)
    operation = request(incident=resolved)
    operation.refresh_from_db()
    assert operation.incident == resolved
    requested = AuditEvent.objects.get(operation=operation, action="operation.requested")
    assert requested.details["incident"] == resolved.pk


def test_an_operation_serves_no_incident_unless_asked(runbook_target):
    IncidentFactory().affected_targets.add(runbook_target)
    operation = services.request_verify(actor=OPERATOR, target=runbook_target)
    assert operation.incident is None


# --- the runbook's Scenario 1, end to end --------------------------------------------------------
def test_scenario_1_failed_migration_recovery(pg_target, tmp_path):
    """A migration failed half-way and left the lock held: status shows it, unlock, rollback,
    then (the migration reverted in the application) verify is clean."""
    pg_target.create_runbook_books(applied=(USERS[0], EMAIL[0], ORDERS[0]), lock_age=None)
    apply_directly(pg_target, USERS, EMAIL)
    pg_target.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER)")  # half
    pg_target.take_runbook_lock(lock_age=dt.timedelta(minutes=3), locked_by="deploy-13 (OOM)")
    target = TargetFactory(db=pg_target, name="shop", max_retries=0)
    folder = write_folder(tmp_path, USERS, EMAIL, (ORDERS[0], ORDERS[1], "DROP TABLE orders;"))
    services.import_scripts(actor=OPERATOR, target=target, directory=folder)

    status = services.read_target_status(target)
    assert status.observation.state(status.observation.observed_at, target.lock_timeout) == "stale"
    assert status.observation.holder == "deploy-13 (OOM)"

    assert (
        run(services.request_force_unlock(actor=OPERATOR, target=target, reason="OOM")).status
        == OperationStatus.SUCCEEDED
    )
    rollback = run(services.request_rollback(actor=OPERATOR, target=target, reason="half-applied"))
    assert rollback.status == OperationStatus.SUCCEEDED, rollback.error
    assert "orders" not in catalog_of(pg_target).tables

    write_folder(tmp_path, USERS, EMAIL)  # the application reverts the migration
    services.import_scripts(actor=OPERATOR, target=target, directory=tmp_path)
    verify = run(services.request_verify(actor=OPERATOR, target=target))
    assert verify.result == {"ok": True, "problems": [], "applied": 2, "scripts": 2}


# --- two rollbacks at the same moment ------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_two_simultaneous_rollbacks_run_once(pg_target, tmp_path):
    pg_target.create_runbook_books()
    apply_directly(pg_target, USERS, EMAIL)
    target = TargetFactory(db=pg_target, lock_timeout_seconds=2, max_retries=0)
    services.import_scripts(
        actor=OPERATOR, target=target, directory=write_folder(tmp_path, USERS, EMAIL)
    )
    barrier = threading.Barrier(2)
    outcomes = []

    def request():
        try:
            barrier.wait()
            outcomes.append(
                services.request_rollback(actor=OPERATOR, target=target, reason="race").status
            )
        except services.ServiceError as error:
            outcomes.append(str(error))
        finally:
            console_connection.close()

    threads = [threading.Thread(target=request) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert Operation.objects.filter(kind="rollback").count() == 1
    refused = [o for o in outcomes if o not in ("queued", "succeeded")]
    assert len(refused) == 1 and "already in progress" in refused[0]
    assert books_of(pg_target) == ["001_create_users.sql"]


# --- the console's cost of a run -----------------------------------------------------------------
def test_a_run_takes_a_handful_of_console_queries(runbook_target):
    operation = services.request_rollback(actor=OPERATOR, target=runbook_target, reason="x")
    with CaptureQueriesContext(console_connection) as captured:
        operation = run(operation)
    assert operation.status == OperationStatus.SUCCEEDED, operation.error
    queries = [
        query["sql"]
        for query in captured.captured_queries
        if not query["sql"].startswith(("SAVEPOINT", "RELEASE SAVEPOINT"))  # the test's own
    ]
    # The claim, the operation with its target, its script, the lock as the run left it, the
    # outcome, its audit event (and the audit chain's head), and whether any incident is open
    # to note it on.
    assert len(queries) <= 8, "\n".join(queries)
    assert AuditEvent.objects.filter(operation=operation, action="operation.succeeded").exists()
    assert operation.target.lock_observation.held is False


# --- kept target connections ---------------------------------------------------------------------
# Session state a migration's SQL may leave behind: a SET, a temporary table, a session lock.
LITTERING = (
    "002_littering.sql",
    "CREATE TABLE run_session AS SELECT pg_backend_pid() AS pid;\n"
    "SET lock_timeout = '1min';\n"
    "SET opsconsole_test.left_behind = 'yes';\n"
    "CREATE TEMPORARY TABLE left_behind (id INTEGER);\n"
    "SELECT pg_advisory_lock(4242);",
    "DROP TABLE run_session;",
)
SESSION = (
    "SELECT pg_backend_pid() AS pid, current_schema() AS schema,"
    " current_setting('lock_timeout') AS lock_timeout,"
    " coalesce(current_setting('opsconsole_test.left_behind', true), '') AS left_behind,"
    " to_regclass('pg_temp.left_behind') IS NOT NULL AS temporary_table,"
    " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    "  AND pid = pg_backend_pid()) AS advisory_locks"
)


@pytest.fixture
def littering_target(pg_target, tmp_path, settings):
    """001 applied, 002 pending; the console keeps its target connections."""
    settings.TARGET_KEEP_CONNECTIONS = True
    pg_target.create_runbook_books(applied=("001_create_users.sql",))
    apply_directly(pg_target, USERS)
    target = TargetFactory(db=pg_target, lock_timeout_seconds=2, max_retries=0)
    services.import_scripts(
        actor=OPERATOR, target=target, directory=write_folder(tmp_path, USERS, LITTERING)
    )
    target.db = pg_target
    return target


def run_session_pid(target) -> int:
    [(pid,)] = target.db.query("SELECT pid FROM run_session")
    return pid


def test_the_next_user_of_a_kept_connection_finds_none_of_a_runs_session_state(
    littering_target, settings
):
    applied = run(services.request_apply(actor=OPERATOR, target=littering_target, reason="r"))
    assert applied.status == OperationStatus.SUCCEEDED, applied.error

    with services.open_target(littering_target) as connection:
        session = connection.fetch_dicts(SESSION)[0]
    assert session == {
        "pid": run_session_pid(littering_target),  # the very connection the run used
        "schema": littering_target.db.schema,
        "lock_timeout": f"{settings.TARGET_STATEMENT_TIMEOUT}s",
        "left_behind": "",
        "temporary_table": False,
        "advisory_locks": 0,
    }
    rolled_back = run(
        services.request_rollback(actor=OPERATOR, target=littering_target, reason="r")
    )
    assert rolled_back.status == OperationStatus.SUCCEEDED, rolled_back.error
    assert books_of(littering_target.db) == ["001_create_users.sql"]


def test_a_kept_connection_that_died_between_runs_is_replaced(littering_target):
    applied = run(services.request_apply(actor=OPERATOR, target=littering_target, reason="r"))
    assert applied.status == OperationStatus.SUCCEEDED, applied.error
    pid = run_session_pid(littering_target)
    littering_target.db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + 5
    while littering_target.db.query("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)):
        assert time.monotonic() < deadline, "the terminated session lingers"
        time.sleep(0.02)

    rolled_back = run(
        services.request_rollback(actor=OPERATOR, target=littering_target, reason="r")
    )

    assert rolled_back.status == OperationStatus.SUCCEEDED, rolled_back.error
    assert books_of(littering_target.db) == ["001_create_users.sql"]
    with services.open_target(littering_target) as connection:
        assert connection.fetch_dicts(SESSION)[0]["pid"] != pid
