"""``ops register``, ``ops status`` and ``ops rotate-secrets``: the target databases themselves."""

from __future__ import annotations

import json

from django.core.management.base import CommandError

from migrations_ops import selectors, services
from migrations_ops.cli.subcommand import Subcommand
from migrations_ops.engine import CONVENTIONS
from migrations_ops.models import Environment


def _register_arguments(register) -> None:
    register.add_argument("--name", required=True)
    register.add_argument("--url", required=True, help="postgresql://… or sqlite:///path")
    register.add_argument("--convention", required=True, choices=sorted(CONVENTIONS))
    register.add_argument("--environment", required=True, choices=Environment.values)
    register.add_argument("--schema", default="")
    register.add_argument("--lock-timeout", type=int, default=60, help="seconds")
    register.add_argument(
        "--health-url", default="", help="the application's health endpoint (2xx: healthy)"
    )


def register(command, actor, options) -> None:
    target = services.register_target(
        actor=actor,
        name=options["name"],
        url=options["url"],
        convention=options["convention"],
        environment=options["environment"],
        schema=options["schema"],
        lock_timeout_seconds=options["lock_timeout"],
        health_url=options["health_url"],
    )
    command.stdout.write(f"registered {target.name} ({target.environment}, {target.convention})")


def _status_arguments(status) -> None:
    status.add_argument("--target", help="one target (default: all)")
    status.add_argument("--json", action="store_true", help="machine-readable output")


def status(command, actor, options) -> None:
    targets = (
        [services.get_target(options["target"])]
        if options["target"]
        else list(selectors.targets_with_observations())
    )
    statuses = [services.read_target_status(target) for target in targets]
    reports = [selectors.status_report(s.target, s.applied, s.error) for s in statuses]
    if options["json"]:
        command.stdout.write(json.dumps({"targets": reports}, indent=2))
    else:
        for report in reports:
            _print_status(command, report)
    failed = [s for s in statuses if s.error]
    if failed:
        raise CommandError("; ".join(f"{s.target.name}: {s.error}" for s in failed))


def _print_status(command, report) -> None:
    lock = report["lock"]
    heading = [report["name"], report["environment"], report["convention"], report["dialect"]]
    command.stdout.write("  ".join(heading))
    if report["error"]:
        command.stdout.write(f"  unreachable: {report['error']}")
        return
    since = f" since {lock['since']}" if lock["since"] else ""
    command.stdout.write(
        f"  lock: {selectors.describe_lock(lock)}{since} "
        f"(lock timeout {lock['lock_timeout_seconds']} s)"
    )
    applied = report["applied_migrations"]
    latest = f", latest {applied[-1]['name']} at {applied[-1]['applied_at']}" if applied else ""
    command.stdout.write(f"  applied: {len(applied)} migration(s){latest}")


def rotate_secrets(command, actor, options) -> None:
    count = services.rotate_target_secrets(actor=actor)
    command.stdout.write(
        f"re-encrypted {count} connection URL{'s' if count != 1 else ''} with the first key "
        "of TARGET_SECRET_KEY: the older keys may now be removed"
    )


REGISTER = Subcommand("register", "register a target database", register, _register_arguments)
STATUS = Subcommand("status", "read lock and applied migrations, live", status, _status_arguments)
ROTATE_SECRETS = Subcommand(
    "rotate-secrets",
    "encrypt every connection URL again with the first key of TARGET_SECRET_KEY",
    rotate_secrets,
)
