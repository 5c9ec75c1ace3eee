"""Demo data for a newcomer: one SQLite target whose lock a crashed deploy left behind 20
minutes ago, an open incident about it, one healthy target, a sandbox target with the runbook's
two drills scheduled, and an admin user. Re-running resets
both targets; the incident is opened once (incidents are history: never deleted)."""

from __future__ import annotations

import datetime as dt
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import Environment, Target

# filename -> (up, down), written as dbmate files into the demo's migrations folder.
DEMO_MIGRATIONS = {
    "001_create_customers.sql": (
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)",
        "DROP TABLE customers",
    ),
    "002_create_orders.sql": (
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, total NUMERIC)",
        "DROP TABLE orders",
    ),
    "003_add_orders_customer_index.sql": (
        "CREATE INDEX orders_customer ON orders (customer_id)",
        "DROP INDEX orders_customer",
    ),
}
# Imported but not applied: something to preview with a dry run and apply.
PENDING_MIGRATION = (
    "004_add_orders_status.sql",
    "ALTER TABLE orders ADD COLUMN status TEXT NOT NULL DEFAULT 'new'",
    "ALTER TABLE orders DROP COLUMN status",
)


@dataclass
class DemoResult:
    username: str
    password: str
    targets: list[Target]
    incident: object  # incidents.models.Incident (that app builds on this one)


def load_demo(directory: Path) -> DemoResult:
    directory.mkdir(parents=True, exist_ok=True)
    now = timezone.now()
    stuck = _write_runbook_database(
        directory / "orders-demo.sqlite3",
        lock=("deploy-4521 on web-2 (crashed mid-migration)", now - dt.timedelta(minutes=20)),
    )
    healthy = _write_runbook_database(directory / "billing-demo.sqlite3", lock=None)
    with transaction.atomic():
        username, password = _reset_admin_user()
        targets = [
            _upsert_target("orders-demo", stuck, Environment.STAGING),
            _upsert_target("billing-demo", healthy, Environment.DEVELOPMENT),
        ]
    migrations = _write_migrations_folder(directory / "migrations")
    for target in targets:
        target.scripts.all().delete()
        services.import_scripts(
            actor=Actor.shell_operator(), target=target, directory=str(migrations)
        )
    incident = _open_demo_incident(
        targets[0], username, lock_left_at=now - dt.timedelta(minutes=20)
    )
    targets.append(_load_sandbox(directory))
    return DemoResult(username, password, targets, incident)


def _load_sandbox(directory: Path) -> Target:
    """A sandbox target for the drills, every imported script applied (the rollback drill
    wants nothing pending), with both of the runbook's drills scheduled: overdue until run."""
    from incidents.models import DrillKind
    from incidents.services import schedule_drill

    path = _write_runbook_database(directory / "sandbox-demo.sqlite3", lock=None)
    with transaction.atomic():
        sandbox = _upsert_target("sandbox-demo", path, Environment.SANDBOX)
    folder = _write_migrations_folder(directory / "migrations-sandbox", pending=False)
    sandbox.scripts.all().delete()
    actor = Actor.shell_operator()
    services.import_scripts(actor=actor, target=sandbox, directory=str(folder))
    for kind in DrillKind.values:
        schedule_drill(actor=actor, kind=kind, target=sandbox)
    return sandbox


def _open_demo_incident(target: Target, commander_name: str, lock_left_at: dt.datetime):
    # incidents builds on this app: imported here, where the demo needs it
    from incidents.models import OPEN_STATUSES, Scenario, Severity
    from incidents.services import open_incident

    already_open = target.incidents.filter(status__in=OPEN_STATUSES).first()
    if already_open is not None:
        return already_open
    return open_incident(
        actor=Actor.shell_operator(),
        title="Orders deploys blocked: migration lock left by a crashed deploy",
        scenario=Scenario.CONCURRENT_CONFLICT,
        severity=Severity.SEV2,
        targets=[target],
        culprit_migration="003_add_orders_customer_index.sql",
        impact_started_at=lock_left_at,
        commander=get_user_model().objects.get(username=commander_name),
    )


def _write_migrations_folder(path: Path, *, pending: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.sql"):
        old.unlink()
    scripts = {**DEMO_MIGRATIONS, PENDING_MIGRATION[0]: PENDING_MIGRATION[1:]}
    if not pending:
        scripts = dict(DEMO_MIGRATIONS)
    for filename, (up, down) in scripts.items():
        (path / filename).write_text(f"-- migrate:up\n{up};\n\n-- migrate:down\n{down};\n")
    return path


def _write_runbook_database(path: Path, lock: tuple[str, dt.datetime] | None) -> Path:
    path.unlink(missing_ok=True)
    connection = sqlite3.connect(path)
    with connection:
        connection.execute(
            "CREATE TABLE migrations (filename TEXT PRIMARY KEY, applied_at TIMESTAMP)"
        )
        connection.execute(
            "CREATE TABLE migration_lock (id INTEGER PRIMARY KEY CHECK (id = 1), "
            "locked_at TIMESTAMP NOT NULL, locked_by TEXT)"
        )
        applied_at = timezone.now() - dt.timedelta(days=len(DEMO_MIGRATIONS))
        for filename, (statement, _) in DEMO_MIGRATIONS.items():
            connection.execute(statement)
            connection.execute(
                "INSERT INTO migrations (filename, applied_at) VALUES (?, ?)",
                (filename, applied_at.isoformat(sep=" ")),
            )
            applied_at += dt.timedelta(days=1)
        if lock:
            holder, locked_at = lock
            connection.execute(
                "INSERT INTO migration_lock (id, locked_at, locked_by) VALUES (1, ?, ?)",
                (locked_at.isoformat(sep=" "), holder),
            )
    connection.close()
    return path


def _upsert_target(name: str, path: Path, environment: str) -> Target:
    target, _ = Target.objects.update_or_create(
        name=name,
        defaults={
            "connection_url": f"sqlite:///{path.resolve()}",
            "convention": "runbook",
            "environment": environment,
            "lock_timeout_seconds": 60,
        },
    )
    services.record_audit_event(
        Actor.shell_operator(), "target.demo_loaded", target=target, details={"path": str(path)}
    )
    return target


def _reset_admin_user() -> tuple[str, str]:
    password = secrets.token_urlsafe(12)
    user, _ = get_user_model().objects.get_or_create(username="admin")
    user.is_staff = True
    user.is_superuser = True
    user.is_active = True
    user.set_password(password)
    user.save()
    return user.username, password
