"""``python manage.py ops``: register, status, unlock."""

import datetime as dt
import io
import json

import pytest
from django.core.management import CommandError, call_command

from migrations_ops.models import AuditEvent, Operation, OperationStatus, Target
from tests.factories import ON_CALL_PERMISSIONS, TargetFactory, UserFactory

pytestmark = pytest.mark.django_db


def ops(*args) -> str:
    out = io.StringIO()
    call_command("ops", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_register_then_status_json(pg_target):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=5), locked_by="deploy-1")
    url = pg_target.url.replace("postgres@", "postgres:pw-marker@")
    printed = ops(
        "register",
        "--name",
        "orders",
        "--url",
        url,
        "--convention",
        "runbook",
        "--environment",
        "staging",
        "--schema",
        pg_target.schema,
        "--lock-timeout",
        "120",
    )
    assert printed.strip() == "registered orders (staging, runbook)"
    assert Target.objects.get(name="orders").lock_timeout_seconds == 120

    report = json.loads(ops("status", "--target", "orders", "--json"))
    (target,) = report["targets"]
    assert target["lock"]["state"] == "stale"
    assert target["lock"]["holder"] == "deploy-1"
    assert 295 < target["lock"]["age_seconds"] < 400
    assert [m["name"] for m in target["applied_migrations"]] == [
        "001_create_users.sql",
        "002_add_email.sql",
    ]
    assert "pw-marker" not in json.dumps(report)
    event = AuditEvent.objects.get(action="target.registered")
    assert event.door == "cli"
    assert "pw-marker" not in json.dumps(event.details)


def test_register_refuses_bad_input():
    with pytest.raises(CommandError, match="unsupported target URL scheme mysql"):
        ops(
            "register",
            "--name",
            "x",
            "--url",
            "mysql://db/x",
            "--convention",
            "knex",
            "--environment",
            "staging",
        )
    with pytest.raises(CommandError, match="schema can only be set for PostgreSQL"):
        ops(
            "register",
            "--name",
            "x",
            "--url",
            "sqlite:////tmp/x.db",
            "--convention",
            "knex",
            "--environment",
            "staging",
            "--schema",
            "public",
        )
    assert Target.objects.count() == 0


def test_status_of_all_targets_fails_when_one_is_unreachable(sqlite_target):
    sqlite_target.create_knex_books(locked=True)
    TargetFactory(db=sqlite_target, name="alive", convention="knex")
    TargetFactory(name="gone", connection_url="postgresql://u:pw-marker@127.0.0.1:1/x")
    out = io.StringIO()
    with pytest.raises(CommandError, match="gone: cannot connect to target") as caught:
        call_command("ops", "status", stdout=out)
    printed = out.getvalue()
    assert "alive  staging  knex  sqlite" in printed
    assert "held 0 s (first seen held; the table keeps no time)" in printed
    assert "pw-marker" not in printed + str(caught.value)


@pytest.mark.django_db(transaction=True)
def test_unlock_releases_and_reports(any_target):
    """Committed for real, so the (in-process) task runs before the command reports."""
    any_target.create_runbook_books(lock_age=dt.timedelta(minutes=20), locked_by="deploy-7")
    TargetFactory(db=any_target, name="orders")
    printed = ops("unlock", "--target", "orders", "--reason", "crashed deploy", "--wait", "5")
    operation = Operation.objects.get()
    assert f"operation #{operation.pk} succeeded\nlock released (was held by deploy-7" in printed
    assert operation.status == OperationStatus.SUCCEEDED
    assert operation.door == "cli"
    assert any_target.runbook_lock_rows() == []


def test_unlock_fresh_lock_needs_force(pg_target, django_capture_on_commit_callbacks):
    pg_target.create_runbook_books(lock_age=dt.timedelta(seconds=3))
    TargetFactory(db=pg_target, name="orders")
    with pytest.raises(CommandError, match=r"not stale .*CLI: --force"):
        ops("unlock", "--target", "orders", "--reason", "x")
    assert len(pg_target.runbook_lock_rows()) == 1
    with (
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(CommandError, match="still queued"),
    ):
        ops("unlock", "--target", "orders", "--reason", "evicted pod", "--force", "--wait", "0")
    assert pg_target.runbook_lock_rows() == []


def test_unlock_as_a_user_uses_that_users_permissions(pg_target):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20))
    TargetFactory(db=pg_target, name="orders")
    UserFactory(username="auditor", permissions=["migrations_ops.view_target"])
    with pytest.raises(CommandError, match="auditor is not allowed to force-release"):
        ops("--as", "auditor", "unlock", "--target", "orders", "--reason", "x")
    with pytest.raises(CommandError, match="unknown user 'nobody'"):
        ops("--as", "nobody", "unlock", "--target", "orders", "--reason", "x")
    assert len(pg_target.runbook_lock_rows()) == 1
    assert Operation.objects.count() == 0


def test_unlock_as_an_engineer_is_recorded_under_their_name(
    pg_target, django_capture_on_commit_callbacks
):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20))
    TargetFactory(db=pg_target, name="orders")
    UserFactory(username="oncall", permissions=ON_CALL_PERMISSIONS)
    with (
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(CommandError, match="still queued"),
    ):
        ops("--as", "oncall", "unlock", "--target", "orders", "--reason", "stuck", "--wait", "0")
    operation = Operation.objects.get()
    assert operation.requested_by.username == "oncall"
    assert operation.requested_by_name == "oncall"


def test_unlock_without_waiting_leaves_the_operation_queued(pg_target):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20))
    TargetFactory(db=pg_target, name="orders")
    # Inside the test's transaction on-commit never fires: the task is not sent.
    with pytest.raises(CommandError, match="is still queued") as caught:
        ops("unlock", "--target", "orders", "--reason", "stuck", "--wait", "0")
    assert caught.value.returncode == 2
    assert Operation.objects.get().status == "queued"
    assert len(pg_target.runbook_lock_rows()) == 1


# --- migrations: import, up, rollback, verify, cleanup, mark --------------------------------------
@pytest.fixture
def shop(pg_target, tmp_path):
    """A committed target (the CLI waits for in-process tasks, which run on commit)."""
    from tests.scripts_folder import EMAIL, ORDERS, USERS, apply_directly, write_folder

    pg_target.create_runbook_books()
    apply_directly(pg_target, USERS, EMAIL)
    TargetFactory(db=pg_target, name="shop", lock_timeout_seconds=2, max_retries=0)
    folder = write_folder(tmp_path / "migrations", USERS, EMAIL, ORDERS)
    return pg_target, folder


@pytest.mark.django_db(transaction=True)
def test_import_up_rollback_verify_from_the_command_line(shop):
    target_db, folder = shop
    printed = ops("import", "--target", "shop", "--dir", str(folder))
    assert "imported into shop: 3 added, 0 updated, 0 unchanged, 0 drift" in printed

    with pytest.raises(CommandError) as caught:
        ops("verify", "--target", "shop")
    assert str(caught.value) == "pending: 003_create_orders.sql is pending"

    preview = ops("up", "--target", "shop", "--dry-run")
    assert "003_create_orders.sql (up) line 2: CREATE TABLE orders" in preview
    assert "table_added: orders" in preview
    assert "dry run: rolled back, nothing was changed" in preview

    with pytest.raises(CommandError, match="a reason is required to apply migrations"):
        ops("up", "--target", "shop")
    applied = ops("up", "--target", "shop", "--reason", "release 7")
    assert "books: recorded 003_create_orders.sql as applied" in applied
    assert ops("verify", "--target", "shop").strip().endswith("0 problem(s)")

    rolled_back = ops("rollback", "--target", "shop", "--reason", "orders broke checkout")
    assert "books: removed 003_create_orders.sql from the books" in rolled_back
    assert target_db.query("SELECT to_regclass('orders') IS NULL")[0][0] is True


@pytest.mark.django_db(transaction=True)
def test_verify_json_and_one_line_per_problem(shop):
    target_db, folder = shop
    ops("import", "--target", "shop", "--dir", str(folder))
    target_db.execute(
        "INSERT INTO migrations (filename, applied_at) VALUES ('000_legacy.sql', now())"
    )
    out = io.StringIO()
    with pytest.raises(CommandError) as caught:
        call_command("ops", "verify", "--target", "shop", "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert report["ok"] is False
    lines = str(caught.value).splitlines()
    assert len(lines) == len(report["problems"]) == 3
    assert lines[0] == "applied_unknown: 000_legacy.sql is applied but no script is known for it"


@pytest.mark.django_db(transaction=True)
def test_reimport_with_drift_exits_non_zero(shop):
    from tests.scripts_folder import EMAIL, ORDERS, USERS, write_folder

    _, folder = shop
    ops("import", "--target", "shop", "--dir", str(folder))
    write_folder(folder, USERS, (EMAIL[0], "ALTER TABLE users ADD COLUMN e TEXT;", ""), ORDERS)
    with pytest.raises(CommandError, match=r"NOT replaced \(drift\): 002_add_email.sql"):
        ops("import", "--target", "shop", "--dir", str(folder))


@pytest.mark.django_db(transaction=True)
def test_cleanup_and_fixing_the_books(shop):
    target_db, folder = shop
    ops("import", "--target", "shop", "--dir", str(folder))
    target_db.take_runbook_lock(lock_age=dt.timedelta(minutes=5), locked_by="gone")
    assert "removed the stale lock row" in ops("cleanup", "--target", "shop", "--reason", "x")
    assert target_db.runbook_lock_rows() == []

    printed = ops("mark-applied", "--target", "shop", "--version", "003", "--reason", "by hand")
    assert "recorded 003_create_orders.sql as applied (no SQL run)" in printed
    printed = ops("mark-rolled-back", "--target", "shop", "--version", "003", "--reason", "undo")
    assert "removed 003_create_orders.sql from the books (no SQL run)" in printed
    with pytest.raises(CommandError, match="unknown version 042"):
        ops("mark-applied", "--target", "shop", "--version", "042", "--reason", "x")


def test_import_of_a_bad_folder_is_one_line(pg_target, tmp_path):
    TargetFactory(db=pg_target, name="shop")
    (tmp_path / "001_x.sql").write_text("-- migrate:up\nSELECT 1;\n-- migrate:sideways\n")
    with pytest.raises(CommandError) as caught:
        ops("import", "--target", "shop", "--dir", str(tmp_path))
    assert str(caught.value).startswith(f"{tmp_path.name}/001_x.sql:3: ")
    assert "\n" not in str(caught.value)
    with pytest.raises(CommandError, match="nope"):
        ops("import", "--target", "shop", "--dir", str(tmp_path / "nope"))


@pytest.mark.django_db(transaction=True)
def test_two_rollbacks_started_at_once_from_two_processes_run_once(shop, settings):
    """Two ``ops rollback`` processes at the same moment: one runs, the other is refused."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.worker import database_url

    target_db, folder = shop
    ops("import", "--target", "shop", "--dir", str(folder))
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}},
        "DJANGO_SETTINGS_MODULE": "opsconsole.settings",
        "DATABASE_URL": database_url(settings.DATABASES["default"]),
    }
    root = Path(__file__).resolve().parents[2]
    command = [
        sys.executable,
        "manage.py",
        "ops",
        "rollback",
        "--target",
        "shop",
        "--version",
        "002",
    ]
    command += ["--reason", "the same migration, twice"]
    processes = [
        subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [
        (p.wait(timeout=60), *(s.read().decode() for s in (p.stdout, p.stderr))) for p in processes
    ]

    assert sorted(code for code, _, _ in results) == [0, 1]
    refused = next(err for code, _, err in results if code == 1)
    assert any(
        words in refused
        for words in ("already in progress on shop", "has just ended", "is not applied")
    ), refused
    assert Operation.objects.filter(kind="rollback").count() == 1
    assert [row[0] for row in target_db.query("SELECT filename FROM migrations")] == [
        "001_create_users.sql"
    ]


def test_approve_from_the_command_line_needs_a_second_person(pg_target):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20))
    TargetFactory(db=pg_target, name="prod", environment="production", requires_approval=True)
    UserFactory(username="oncall", permissions=ON_CALL_PERMISSIONS)
    UserFactory(
        username="commander",
        permissions=[*ON_CALL_PERMISSIONS, "migrations_ops.approve_operation"],
    )
    printed = ops("--as", "oncall", "unlock", "--target", "prod", "--reason", "stuck")
    operation = Operation.objects.get()
    assert f"operation #{operation.pk} awaits approval by a second person" in printed

    with pytest.raises(CommandError, match="not allowed to approve"):
        ops("--as", "oncall", "approve", "--operation", str(operation.pk))
    with pytest.raises(CommandError, match="no operation #999"):
        ops("--as", "commander", "approve", "--operation", "999")
    printed = ops("--as", "commander", "reject", "--operation", str(operation.pk), "--reason", "no")
    assert f"operation #{operation.pk} rejected: no" in printed
    operation.refresh_from_db()
    assert operation.status == "cancelled"
    assert len(pg_target.runbook_lock_rows()) == 1


# --- the incident an operation serves ------------------------------------------------------------
OPERATION_COMMANDS = {
    "unlock": ["--reason", "stuck"],
    "up": ["--dry-run"],
    "rollback": ["--dry-run"],
    "verify": [],
    "cleanup": ["--reason", "tidy"],
    "mark-applied": ["--version", "003", "--reason", "ran by hand"],
    "mark-rolled-back": ["--version", "002", "--reason", "undone by hand"],
}


@pytest.mark.parametrize("command", OPERATION_COMMANDS)
def test_every_operation_command_serves_the_incident_it_names(shop, command):
    from incidents.models import IncidentStatus
    from tests.factories import IncidentFactory

    target_db, folder = shop
    ops("import", "--target", "shop", "--dir", str(folder))
    if command == "unlock":
        target_db.take_runbook_lock(lock_age=dt.timedelta(minutes=20), locked_by="gone")
    args = [command, "--target", "shop", *OPERATION_COMMANDS[command], "--wait", "0"]
    closed = IncidentFactory(status=IncidentStatus.CLOSED)
    served = IncidentFactory(status=IncidentStatus.MITIGATING)

    with pytest.raises(CommandError) as caught:
        ops(*args, "--incident", str(closed.pk))
    assert str(caught.value) == (
        f"incident #{closed.pk} is closed: operations can no longer be linked to it"
    )
    with pytest.raises(CommandError) as caught:
        ops(*args, "--incident", "999999")
    assert str(caught.value) == "no incident #999999"
    assert not Operation.objects.exists()

    # Inside the test's transaction the task is never sent: the operation stays queued.
    with pytest.raises(CommandError, match="is still queued"):
        ops(*args, "--incident", str(served.pk))
    assert Operation.objects.get().incident == served


def test_register_takes_a_health_url():
    register = [
        "register",
        "--url",
        "sqlite:////tmp/orders.sqlite3",
        "--convention",
        "runbook",
        "--environment",
        "staging",
    ]
    ops(*register, "--name", "orders", "--health-url", "https://orders.internal/healthz")
    assert Target.objects.get(name="orders").health_url == "https://orders.internal/healthz"

    with pytest.raises(CommandError, match=r"^health_url: Enter a valid URL\.$"):
        ops(*register, "--name", "billing", "--health-url", "billing health")
    assert not Target.objects.filter(name="billing").exists()


def test_register_refuses_a_health_url_on_a_private_address(settings):
    settings.HEALTH_CHECK_ALLOWED_NETWORKS = []
    register = ["register", "--url", "sqlite:////tmp/orders.sqlite3", "--convention", "runbook"]
    with pytest.raises(CommandError) as refused:
        ops(
            *register,
            *("--environment", "staging", "--name", "orders"),
            *("--health-url", "http://169.254.169.254/latest/meta-data/"),
        )
    assert str(refused.value) == (
        "health_url: 169.254.169.254 is a loopback, link-local or private address: health "
        "checks do not go there unless HEALTH_CHECK_ALLOWED_NETWORKS allows it."
    )
    assert not Target.objects.filter(name="orders").exists()


def test_ops_workers_fails_while_none_is_alive_and_lists_those_heard_from(own_queue):
    from migrations_ops import services

    with pytest.raises(CommandError, match=f"no worker of queue '{own_queue}' has ever been seen"):
        ops("workers")

    services.record_worker_alive("w1@host", queues=[own_queue], pid=7)
    services.record_worker_alive("w2@host", queues=[own_queue], pid=8)
    services.record_worker_stopped("w2@host")
    lines = ops("workers").splitlines()

    assert lines[0].startswith(f"w2@host  stopped  queues={own_queue}  last seen=")
    assert lines[1].startswith(f"w1@host  alive  queues={own_queue}  last seen=")
    assert lines[2] == f"1 worker(s) of queue '{own_queue}' alive: w1@host"


def test_ops_workers_with_tasks_run_in_process():
    assert ops("workers").strip().endswith("no worker is needed")
