"""``python manage.py ops``: the console's command-line door.

Errors go to stderr as one line with a non-zero exit status. Without ``--as USER`` the command
acts as the host's operator (recorded under the OS account name); with it, as that console
user, with that user's permissions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from migrations_ops import selectors, services
from migrations_ops.actors import Actor
from migrations_ops.demo import load_demo
from migrations_ops.engine import CONVENTIONS
from migrations_ops.models import Environment, Operation

WAIT_POLL_SECONDS = 0.2


class Command(BaseCommand):
    help = "Operate on target databases: register, status, unlock, demo."

    def add_arguments(self, parser):
        parser.add_argument("--as", dest="as_user", metavar="USER", help="act as this console user")
        commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

        register = commands.add_parser("register", help="register a target database")
        register.add_argument("--name", required=True)
        register.add_argument("--url", required=True, help="postgresql://… or sqlite:///path")
        register.add_argument("--convention", required=True, choices=sorted(CONVENTIONS))
        register.add_argument("--environment", required=True, choices=Environment.values)
        register.add_argument("--schema", default="")
        register.add_argument("--lock-timeout", type=int, default=60, help="seconds")

        status = commands.add_parser("status", help="read lock and applied migrations, live")
        status.add_argument("--target", help="one target (default: all)")
        status.add_argument("--json", action="store_true", help="machine-readable output")

        unlock = commands.add_parser("unlock", help="force-release a target's migration lock")
        unlock.add_argument("--target", required=True)
        unlock.add_argument("--reason", required=True)
        unlock.add_argument(
            "--force", action="store_true", help="release even a lock younger than its timeout"
        )
        unlock.add_argument(
            "--wait",
            type=float,
            default=30,
            metavar="SECONDS",
            help="how long to wait for the operation to finish (0: do not wait)",
        )

        commands.add_parser("demo", help="load the demo targets and admin user")

    def handle(self, *args, **options):
        actor = self._actor(options["as_user"])
        handler = getattr(self, f"handle_{options['subcommand']}")
        try:
            return handler(actor, options)
        except services.ServiceError as error:
            raise CommandError(str(error)) from None

    def _actor(self, username: str | None) -> Actor:
        if not username:
            return Actor.shell_operator()
        try:
            user = get_user_model().objects.get(username=username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"unknown user {username!r}") from None
        return Actor.for_user(user, "cli")

    def handle_register(self, actor, options):
        target = services.register_target(
            actor=actor,
            name=options["name"],
            url=options["url"],
            convention=options["convention"],
            environment=options["environment"],
            schema=options["schema"],
            lock_timeout_seconds=options["lock_timeout"],
        )
        self.stdout.write(f"registered {target.name} ({target.environment}, {target.convention})")

    def handle_status(self, actor, options):
        targets = (
            [services.get_target(options["target"])]
            if options["target"]
            else list(selectors.targets_with_observations())
        )
        statuses = [services.read_target_status(target) for target in targets]
        reports = [selectors.status_report(s.target, s.applied, s.error) for s in statuses]
        if options["json"]:
            self.stdout.write(json.dumps({"targets": reports}, indent=2))
        else:
            for report in reports:
                self._print_status(report)
        failed = [s for s in statuses if s.error]
        if failed:
            raise CommandError("; ".join(f"{s.target.name}: {s.error}" for s in failed))

    def _print_status(self, report):
        lock = report["lock"]
        heading = [report["name"], report["environment"], report["convention"], report["dialect"]]
        self.stdout.write("  ".join(heading))
        if report["error"]:
            self.stdout.write(f"  unreachable: {report['error']}")
            return
        since = f" since {lock['since']}" if lock["since"] else ""
        self.stdout.write(
            f"  lock: {selectors.describe_lock(lock)}{since} "
            f"(lock timeout {lock['lock_timeout_seconds']} s)"
        )
        applied = report["applied_migrations"]
        latest = f", latest {applied[-1]['name']} at {applied[-1]['applied_at']}" if applied else ""
        self.stdout.write(f"  applied: {len(applied)} migration(s){latest}")

    def handle_unlock(self, actor, options):
        target = services.get_target(options["target"])
        operation = services.request_force_unlock(
            actor=actor,
            target=target,
            reason=options["reason"],
            release_fresh=options["force"],
            # Naming the target on the command line is the typed confirmation.
            confirm_name=options["target"],
        )
        self.stdout.write(
            f"operation #{operation.pk} requested: force-release lock of {target.name}"
        )
        operation = self._wait(operation, options["wait"])
        if operation.status == "failed":
            raise CommandError(f"operation #{operation.pk} failed: {operation.error}")
        if not operation.is_finished:
            self.stdout.write(f"operation #{operation.pk} is {operation.status}")
            return
        before = operation.result.get("before", {})
        self.stdout.write(
            f"operation #{operation.pk} {operation.status}: lock released "
            f"(was held by {before.get('holder') or 'an unnamed holder'}"
            f"{', since ' + before['locked_at'] if before.get('locked_at') else ''})"
        )

    def _wait(self, operation: Operation, seconds: float) -> Operation:
        deadline = time.monotonic() + seconds
        operation.refresh_from_db()
        while not operation.is_finished and time.monotonic() < deadline:
            time.sleep(WAIT_POLL_SECONDS)
            operation.refresh_from_db()
        return operation

    def handle_demo(self, actor, options):
        result = load_demo(Path(settings.DATA_DIR) / "demo")
        for target in result.targets:
            lock = selectors.describe_lock(selectors.lock_report(target))
            self.stdout.write(f"demo target {target.name}: lock {lock}")
        self.stdout.write(f"admin login: username {result.username}  password {result.password}")
