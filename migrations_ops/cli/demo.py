"""``ops demo``: load the demo targets, an open incident and the admin user."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings

from migrations_ops import selectors
from migrations_ops.cli.subcommand import Subcommand
from migrations_ops.demo import load_demo


def demo(command, actor, options) -> None:
    result = load_demo(Path(settings.DATA_DIR) / "demo")
    for target in result.targets:
        lock = selectors.describe_lock(selectors.lock_report(target))
        command.stdout.write(f"demo target {target.name}: lock {lock}")
    incident = result.incident
    command.stdout.write(f"open incident #{incident.pk}: {incident.title}")
    command.stdout.write(f"admin login: username {result.username}  password {result.password}")


DEMO = Subcommand("demo", "load the demo targets and admin user", demo)
