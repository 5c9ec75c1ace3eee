"""``python manage.py ops``: the console's command-line door.

Errors go to stderr as one line with a non-zero exit status (2 when an operation did not
finish within ``--wait``). Without ``--as USER`` the command acts as the host's operator
(recorded under the OS account name); with it, as that console user, with their permissions.
Naming a production target on the command line is the typed confirmation it needs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from incidents import services as incident_services
from incidents.models import Incident
from migrations_ops import selectors, services
from migrations_ops.actors import Actor
from migrations_ops.demo import load_demo
from migrations_ops.engine import CONVENTIONS
from migrations_ops.models import Environment, Operation, OperationStatus

WAIT_POLL_SECONDS = 0.2


class AwaitingApproval(Exception):
    """The request was taken and now waits for a second person: not an error."""


STILL_RUNNING_EXIT_STATUS = 2


class Command(BaseCommand):
    help = (
        "Operate on target databases: register, status, unlock, import, up, rollback, verify, "
        "cleanup, mark-applied, mark-rolled-back, demo."
    )

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
        register.add_argument(
            "--health-url", default="", help="the application's health endpoint (2xx: healthy)"
        )

        status = commands.add_parser("status", help="read lock and applied migrations, live")
        status.add_argument("--target", help="one target (default: all)")
        status.add_argument("--json", action="store_true", help="machine-readable output")

        unlock = self._operation_parser(commands, "unlock", "force-release a target's lock")
        unlock.add_argument("--reason", required=True)
        unlock.add_argument(
            "--force", action="store_true", help="release even a lock younger than its timeout"
        )

        imports = commands.add_parser("import", help="import a migrations folder's SQL scripts")
        imports.add_argument("--target", required=True)
        imports.add_argument("--dir", required=True, help="the application's migrations folder")

        up = self._operation_parser(commands, "up", "apply pending migrations")
        up.add_argument("--to", dest="to_version", metavar="VERSION", help="stop at this version")
        up.add_argument("--reason", default="", help="required unless --dry-run")
        self._migration_flags(up)

        rollback = self._operation_parser(commands, "rollback", "roll back one migration")
        rollback.add_argument("--version", help="default: the latest applied")
        rollback.add_argument("--reason", default="", help="required unless --dry-run")
        rollback.add_argument(
            "--out-of-order", action="store_true", help="allow rolling back an older migration"
        )
        self._migration_flags(rollback)

        verify = self._operation_parser(commands, "verify", "compare the books with the scripts")
        verify.add_argument("--json", action="store_true", help="machine-readable output")

        cleanup = self._operation_parser(commands, "cleanup", "remove stale locks, repair table")
        cleanup.add_argument("--reason", required=True)

        for name, help_text in [
            ("mark-applied", "record a migration as applied without running SQL"),
            ("mark-rolled-back", "remove a migration from the books without running SQL"),
        ]:
            mark = self._operation_parser(commands, name, help_text)
            mark.add_argument("--version", required=True)
            mark.add_argument("--reason", required=True)

        approve = commands.add_parser("approve", help="approve another person's operation")
        approve.add_argument("--operation", type=int, required=True)
        approve.add_argument("--reason", default="")
        approve.add_argument("--wait", type=float, default=60, metavar="SECONDS")
        reject = commands.add_parser("reject", help="reject an operation awaiting approval")
        reject.add_argument("--operation", type=int, required=True)
        reject.add_argument("--reason", required=True)

        commands.add_parser(
            "sweep", help="send stuck queued operations again, mark dead workers' operations lost"
        )
        commands.add_parser("demo", help="load the demo targets and admin user")

    @staticmethod
    def _operation_parser(commands, name: str, help_text: str):
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("--target", required=True)
        parser.add_argument(
            "--wait",
            type=float,
            default=60,
            metavar="SECONDS",
            help="how long to wait for the operation to finish (0: do not wait)",
        )
        parser.add_argument(
            "--incident",
            type=int,
            metavar="N",
            help="the incident this operation serves (its number): it lands on its timeline",
        )
        return parser

    @staticmethod
    def _migration_flags(parser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="run it and roll back: report what changes"
        )
        parser.add_argument(
            "--non-transactional",
            action="store_true",
            help="allow a migration that cannot run in a transaction (statement by statement)",
        )

    def handle(self, *args, **options):
        actor = self._actor(options["as_user"])
        handler = getattr(self, f"handle_{options['subcommand'].replace('-', '_')}")
        try:
            return handler(actor, options)
        except services.ServiceError as error:
            raise CommandError(str(error)) from None
        except AwaitingApproval as waiting:
            self.stdout.write(str(waiting))
            return None

    def _actor(self, username: str | None) -> Actor:
        if not username:
            return Actor.shell_operator()
        try:
            user = get_user_model().objects.get(username=username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"unknown user {username!r}") from None
        return Actor.for_user(user, "cli")

    # --- targets -------------------------------------------------------------------------------
    def handle_register(self, actor, options):
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

    def handle_import(self, actor, options):
        target = services.get_target(options["target"])
        report = services.import_scripts(actor=actor, target=target, directory=options["dir"])
        for label, names in report.as_dict().items():
            if names:
                self.stdout.write(f"{label}: {', '.join(names)}")
        counts = ", ".join(f"{len(names)} {label}" for label, names in report.as_dict().items())
        self.stdout.write(f"imported into {target.name}: {counts}")
        if report.drift:
            raise CommandError(
                f"{len(report.drift)} applied migration(s) changed in the folder and were NOT "
                f"replaced (drift): {', '.join(report.drift)}"
            )

    # --- operations ----------------------------------------------------------------------------
    def handle_unlock(self, actor, options):
        target = services.get_target(options["target"])
        operation = services.request_force_unlock(
            actor=actor,
            target=target,
            reason=options["reason"],
            release_fresh=options["force"],
            confirm_name=options["target"],
            incident=self._incident(options),
        )
        operation = self._follow(operation, options["wait"])
        before = operation.result.get("before", {})
        self.stdout.write(
            f"lock released (was held by {before.get('holder') or 'an unnamed holder'}"
            f"{', since ' + before['locked_at'] if before.get('locked_at') else ''})"
        )

    def handle_up(self, actor, options):
        operation = services.request_apply(
            actor=actor,
            target=services.get_target(options["target"]),
            reason=options["reason"],
            to_version=options["to_version"],
            dry_run=options["dry_run"],
            non_transactional=options["non_transactional"],
            confirm_name=options["target"],
            incident=self._incident(options),
        )
        self._print_run(self._follow(operation, options["wait"]))

    def handle_rollback(self, actor, options):
        operation = services.request_rollback(
            actor=actor,
            target=services.get_target(options["target"]),
            reason=options["reason"],
            version=options["version"],
            dry_run=options["dry_run"],
            out_of_order=options["out_of_order"],
            non_transactional=options["non_transactional"],
            confirm_name=options["target"],
            incident=self._incident(options),
        )
        self._print_run(self._follow(operation, options["wait"]))

    def handle_verify(self, actor, options):
        operation = services.request_verify(
            actor=actor,
            target=services.get_target(options["target"]),
            incident=self._incident(options),
        )
        operation = self._follow(operation, options["wait"], quiet=options["json"])
        result = operation.result
        if options["json"]:
            self.stdout.write(json.dumps(result, indent=2))
        else:
            self.stdout.write(
                f"{operation.target.name}: {result['applied']} applied, {result['scripts']} "
                f"script(s), {len(result['problems'])} problem(s)"
            )
        if result["problems"]:
            raise CommandError(
                "\n".join(f"{p['code']}: {p['message']}" for p in result["problems"])
            )

    def handle_cleanup(self, actor, options):
        operation = services.request_cleanup(
            actor=actor,
            target=services.get_target(options["target"]),
            reason=options["reason"],
            confirm_name=options["target"],
            incident=self._incident(options),
        )
        operation = self._follow(operation, options["wait"])
        for change in operation.result["changes"] or ["nothing to clean up"]:
            self.stdout.write(change)

    def handle_mark_applied(self, actor, options):
        self._mark(actor, options, applied=True)

    def handle_mark_rolled_back(self, actor, options):
        self._mark(actor, options, applied=False)

    def _mark(self, actor, options, *, applied: bool):
        operation = services.request_mark(
            actor=actor,
            target=services.get_target(options["target"]),
            version=options["version"],
            reason=options["reason"],
            applied=applied,
            confirm_name=options["target"],
            incident=self._incident(options),
        )
        operation = self._follow(operation, options["wait"])
        for change in operation.result["changes"]:
            self.stdout.write(change)

    @staticmethod
    def _incident(options) -> Incident | None:
        number = options["incident"]
        return None if number is None else incident_services.get_incident(number)

    def _print_run(self, operation: Operation) -> None:
        result = operation.result
        for statement in result["statements"]:
            first_line = statement["sql"].splitlines()[0] if statement["sql"] else ""
            self.stdout.write(
                f"  {statement['migration']} ({statement['direction']}) line "
                f"{statement['line']}: {first_line} [{statement['ms']} ms]"
            )
        for entry in result["books"]:
            self.stdout.write(f"  books: {entry}")
        for change in result["changes"]:
            self.stdout.write(f"  {change['kind']}: {change['object']} ({change['detail']})")
        if result["dry_run"]:
            self.stdout.write("dry run: rolled back, nothing was changed")

    def _follow(self, operation: Operation, seconds: float, *, quiet: bool = False) -> Operation:
        """Wait for the operation; a failure or a time-out is an error exit."""
        if not quiet:
            self.stdout.write(
                f"operation #{operation.pk} requested: {operation.get_kind_display()} on "
                f"{operation.target.name}"
            )
        if operation.status == OperationStatus.AWAITING_APPROVAL:
            raise AwaitingApproval(
                f"operation #{operation.pk} awaits approval by a second person "
                f"(ops approve --operation {operation.pk})"
            )
        deadline = time.monotonic() + seconds
        operation.refresh_from_db()
        warning = selectors.broker_down_warning(operation)
        if warning:
            self.stderr.write(f"warning: {warning}")
        while not operation.is_finished and time.monotonic() < deadline:
            time.sleep(WAIT_POLL_SECONDS)
            operation.refresh_from_db()
        if operation.status == OperationStatus.FAILED:
            raise CommandError(f"operation #{operation.pk} failed: {operation.error}")
        if not operation.is_finished:
            raise CommandError(
                f"operation #{operation.pk} is still {operation.status}: "
                f"follow it in the admin or with --wait",
                returncode=STILL_RUNNING_EXIT_STATUS,
            )
        if not quiet:
            self.stdout.write(f"operation #{operation.pk} {operation.status}")
        return operation

    def handle_approve(self, actor, options):
        operation = services.approve_operation(
            actor=actor,
            operation=services.get_operation(options["operation"]),
            reason=options["reason"],
        )
        self.stdout.write(f"operation #{operation.pk} approved by {actor.name}")
        operation = self._follow(operation, options["wait"], quiet=True)
        self.stdout.write(f"operation #{operation.pk} {operation.status}")

    def handle_reject(self, actor, options):
        operation = services.reject_operation(
            actor=actor,
            operation=services.get_operation(options["operation"]),
            reason=options["reason"],
        )
        self.stdout.write(f"operation #{operation.pk} rejected: {options['reason']}")

    def handle_sweep(self, actor, options):
        report = services.sweep_operations(actor=actor)
        for line in report.lines():
            self.stdout.write(line)
        self.stdout.write(
            f"sweep: {len(report.resent)} sent again, {len(report.unsent)} still unsent, "
            f"{len(report.lost)} marked lost"
        )

    def handle_demo(self, actor, options):
        result = load_demo(Path(settings.DATA_DIR) / "demo")
        for target in result.targets:
            lock = selectors.describe_lock(selectors.lock_report(target))
            self.stdout.write(f"demo target {target.name}: lock {lock}")
        incident = result.incident
        self.stdout.write(f"open incident #{incident.pk}: {incident.title}")
        self.stdout.write(f"admin login: username {result.username}  password {result.password}")
