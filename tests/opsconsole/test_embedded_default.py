"""The README's first command: the embedded default (SQLite, tasks in-process, demo data).

Run as real processes, the way a newcomer does, so that ``make run`` cannot rot unnoticed.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def manage(tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in {"DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_TASK_ALWAYS_EAGER", "SECRET_KEY"}
    }
    env.update(DJANGO_SETTINGS_MODULE="opsconsole.settings", OPSCONSOLE_DATA_DIR=str(tmp_path))

    def run(*args, check=True):
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    run.data_dir = tmp_path
    return run


def test_demo_lock_can_be_seen_and_released_on_the_embedded_default(manage):
    manage("migrate", "--noinput")
    assert (manage.data_dir / "opsconsole.sqlite3").exists()

    demo = manage("ops", "demo").stdout
    assert "orders-demo: lock stale: held 20 min by deploy-4521" in demo
    assert "billing-demo: lock free" in demo
    assert re.search(r"admin login: username admin  password \S{12,}", demo)
    incident = re.search(r"open incident #(\d+): Orders deploys blocked", demo).group(1)
    # Loading the demo again resets the targets but does not open a second incident.
    assert f"open incident #{incident}:" in manage("ops", "demo").stdout

    status = manage("ops", "status", "--target", "orders-demo").stdout
    assert "lock: stale" in status
    assert "applied: 3 migration(s), latest 003_add_orders_customer_index.sql" in status

    released = manage(
        "ops",
        "unlock",
        "--target",
        "orders-demo",
        "--reason",
        "crashed deploy",
        "--incident",
        incident,
    )
    assert re.search(
        r"operation #\d+ succeeded\nlock released \(was held by deploy-4521", released.stdout
    )
    assert "lock: free" in manage("ops", "status", "--target", "orders-demo").stdout

    # A rollback and the apply after it: operations claimed, run and finished on SQLite.
    rolled_back = manage(
        "ops", "rollback", "--target", "orders-demo", "--reason", "bad index"
    ).stdout
    assert re.search(r"operation #\d+ succeeded\n.*line 5: DROP INDEX orders_customer", rolled_back)
    assert "books: removed 003_add_orders_customer_index.sql from the books" in rolled_back
    applied = manage("ops", "up", "--target", "orders-demo", "--reason", "fixed").stdout
    assert "books: recorded 003_add_orders_customer_index.sql as applied" in applied
    assert "books: recorded 004_add_orders_status.sql as applied" in applied
    verified = manage("ops", "verify", "--target", "orders-demo").stdout
    assert "orders-demo: 4 applied, 4 script(s), 0 problem(s)" in verified

    again = manage("ops", "unlock", "--target", "orders-demo", "--reason", "again", check=False)
    assert again.returncode == 1
    assert again.stderr.strip() == (
        "CommandError: the migration lock of orders-demo is not held: nothing to release"
    )


def test_cli_errors_are_one_line_on_stderr_with_a_non_zero_exit(manage):
    manage("migrate", "--noinput")
    unknown = manage("ops", "status", "--target", "nope", check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "CommandError: unknown target 'nope'"
    assert unknown.stdout == ""

    manage(
        "ops",
        "register",
        "--name",
        "gone",
        "--url",
        "postgresql://app:pw-marker@127.0.0.1:1/app",
        "--convention",
        "knex",
        "--environment",
        "staging",
    )
    unreachable = manage("ops", "unlock", "--target", "gone", "--reason", "x", check=False)
    assert unreachable.returncode == 1
    assert len(unreachable.stderr.strip().splitlines()) == 1
    assert "cannot connect to target" in unreachable.stderr
    assert "pw-marker" not in unreachable.stderr + unreachable.stdout
