"""``python manage.py ops``: the console's command-line door.

Errors go to stderr as one line with a non-zero exit status (2 when an operation did not
finish within ``--wait``). Without ``--as USER`` the command acts as the host's operator
(recorded under the OS account name); with it, as that console user, with their permissions.
Naming a production target on the command line is the typed confirmation it needs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from incidents import selectors as incident_selectors
from incidents import services as incident_services
from incidents.models import Drill, DrillKind, DrillRunStatus, Incident
from migrations_ops import audit_witness, flag_client, selectors, services
from migrations_ops.actors import Actor
from migrations_ops.demo import load_demo
from migrations_ops.engine import CONVENTIONS
from migrations_ops.fields import SecretKeyError
from migrations_ops.models import AuditEvent, Environment, Operation, OperationStatus
from migrations_ops.refusals import record_refusal

WAIT_POLL_SECONDS = 0.2


class AwaitingApproval(Exception):
    """The request was taken and now waits for a second person: not an error."""


STILL_RUNNING_EXIT_STATUS = 2


class Command(BaseCommand):
    help = (
        "Operate on target databases: register, status, unlock, import, up, rollback, verify, "
        "cleanup, mark-applied, mark-rolled-back, flags, disable, reenable, token, sweep, "
        "workers, automigrate, drill, audit-verify, demo, rotate-secrets."
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

        flags = commands.add_parser("flags", help="show a target's runtime flags, or set some")
        flags.add_argument("--target", required=True)
        flags.add_argument(
            "--set",
            dest="assignments",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="e.g. AUTO_MIGRATE=false (repeatable; needs --reason)",
        )
        flags.add_argument("--reason", default="")
        disable = commands.add_parser(
            "disable", help="emergency-disable auto-migration (the runbook's quick disable)"
        )
        which = disable.add_mutually_exclusive_group(required=True)
        which.add_argument("--target", dest="targets", action="append", metavar="NAME")
        which.add_argument("--all", action="store_true", help="every target")
        disable.add_argument("--reason", required=True)
        reenable = commands.add_parser("reenable", help="take a progressive re-enable step")
        reenable.add_argument("--target", required=True)
        reenable.add_argument("--step", type=int, required=True, choices=[1, 2, 3])
        reenable.add_argument("--reason", required=True)

        token = commands.add_parser("token", help="create, list or revoke applications' API tokens")
        token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
        token_create = token_commands.add_parser(
            "create", help="a new token (printed once, alone on its line: keep it)"
        )
        token_create.add_argument("--name", required=True, help="the application using it")
        token_create.add_argument(
            "--targets", required=True, metavar="N1,N2", help="the targets it may read"
        )
        token_revoke = token_commands.add_parser("revoke", help="revoke a token for good")
        token_revoke.add_argument("prefix", metavar="PREFIX", help="as `ops token list` shows it")
        token_commands.add_parser("list", help="every token: prefix, targets, use, revocation")

        commands.add_parser(
            "sweep", help="send stuck queued operations again, mark dead workers' operations lost"
        )
        commands.add_parser(
            "workers",
            help="the workers last heard from; exit 1 when none of the task queue is alive",
        )
        audit_verify = commands.add_parser(
            "audit-verify",
            help="walk the audit trail's hash chain: name the first event altered, inserted or "
            "removed; compare its end with the witness kept outside the database",
        )
        audit_verify.add_argument(
            "--start-witness",
            action="store_true",
            help="where there is no witness yet (a console upgraded to it), start one at the "
            "chain's end once the chain verifies",
        )
        commands.add_parser("demo", help="load the demo targets and admin user")
        drill = commands.add_parser(
            "drill", help="the runbook's drills on sandbox targets: schedule, run, list"
        )
        drill_commands = drill.add_subparsers(dest="drill_command", required=True, metavar="ACTION")
        for action, help_text in [
            ("schedule", "schedule a drill (monthly lock release, quarterly rollback)"),
            ("run", "run a drill now, here, and print its measured times and score"),
        ]:
            drill_action = drill_commands.add_parser(action, help=help_text)
            drill_action.add_argument("--kind", required=True, choices=DrillKind.values)
            drill_action.add_argument("--target", required=True, help="a sandbox target")
            if action == "schedule":
                drill_action.add_argument(
                    "--disable", action="store_true", help="keep it, but off the schedule"
                )
        drill_commands.add_parser("list", help="every drill: schedule, last run, overdue")
        commands.add_parser(
            "rotate-secrets",
            help="encrypt every connection URL again with the first key of TARGET_SECRET_KEY",
        )

        automigrate = commands.add_parser(
            "automigrate",
            help="what an application runs at start-up: obey its flags, apply what is pending",
        )
        automigrate.add_argument("--target", required=True)
        automigrate.add_argument(
            "--app", default="", help="the application's name, recorded as the actor"
        )
        automigrate.add_argument(
            "--console",
            default=os.environ.get("OPSCONSOLE_URL", ""),
            metavar="URL",
            help="read the flags from this console over HTTP (default: $OPSCONSOLE_URL; "
            "unset: from this host's database)",
        )
        automigrate.add_argument(
            "--token",
            default=os.environ.get("OPSCONSOLE_TOKEN", ""),
            help="the application's API token (default: $OPSCONSOLE_TOKEN)",
        )
        automigrate.add_argument(
            "--cache-file",
            default="",
            metavar="PATH",
            help="where the last flags are kept for MIGRATION_CACHE_TTL seconds "
            "(default: DATA_DIR/automigrate/TARGET.flags.json)",
        )
        automigrate.add_argument(
            "--backoff",
            type=float,
            default=services.AUTO_MIGRATE_BACKOFF_SECONDS,
            metavar="SECONDS",
            help="pause after the first failed attempt, doubling after each next one",
        )

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
        self._refuse_unstorable_text(options)
        actor = self._actor(options["as_user"])
        handler = getattr(self, f"handle_{options['subcommand'].replace('-', '_')}")
        try:
            return handler(actor, options)
        except services.ServiceError as error:
            # A refusal is on the audit trail, after the refused work was rolled back.
            record_refusal(actor, f"cli.{options['subcommand']}", error)
            raise CommandError(str(error)) from None
        except SecretKeyError as error:
            # A key missing from TARGET_SECRET_KEY is one line too, not a traceback.
            raise CommandError(str(error)) from None
        except AwaitingApproval as waiting:
            self.stdout.write(str(waiting))
            return None

    @staticmethod
    def _refuse_unstorable_text(options) -> None:
        """An argument that was not UTF-8 reaches Python holding lone surrogates, which no
        database column (nor the audit trail) can hold: one line, before anything is read."""
        for name, value in options.items():
            for text in value if isinstance(value, list | tuple) else [value]:
                if isinstance(text, str) and services.UNSTORABLE_TEXT.search(text):
                    option = "--as" if name == "as_user" else "--" + name.replace("_", "-")
                    raise CommandError(
                        f"{option} holds a NUL character or text that is not UTF-8: retype it"
                    )

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

    # --- runtime flags -------------------------------------------------------------------------
    def handle_flags(self, actor, options):
        target = services.get_target(options["target"])
        if options["assignments"]:
            changes = {}
            for assignment in options["assignments"]:
                name, equals, value = assignment.partition("=")
                if not equals:
                    raise CommandError(f"--set takes NAME=VALUE, not {assignment!r}")
                changes[name.strip()] = value
            change = services.change_flags(
                actor=actor, target=target, changes=changes, reason=options["reason"]
            )
            self.stdout.write(
                f"flags of {target.name} changed: {selectors.describe_flag_change(change)}"
            )
        self._print_flags(target)

    def _print_flags(self, target):
        for name, value in selectors.flags_of(target).items():
            self.stdout.write(f"{name}={selectors.flag_value_text(value)}")
        self.stdout.write(f"stage: {target.get_flag_stage_display()}")
        step = selectors.next_reenable_step(target)
        if step:
            self.stdout.write(
                f"next re-enable step: {step} ({selectors.REENABLE_STEPS[step].label})"
            )

    def handle_disable(self, actor, options):
        if options["all"]:
            targets = list(selectors.targets_with_observations())
        else:
            targets = [services.get_target(name) for name in options["targets"]]
        changes = services.emergency_disable(actor=actor, targets=targets, reason=options["reason"])
        for change in changes:
            self.stdout.write(
                f"{change.target.name}: disabled ({selectors.describe_flag_change(change)})"
            )
        self.stdout.write(f"auto-migration disabled on {len(changes)} target(s)")

    def handle_reenable(self, actor, options):
        target = services.get_target(options["target"])
        change = services.reenable_step(
            actor=actor, target=target, step=options["step"], reason=options["reason"]
        )
        self.stdout.write(
            f"re-enable step {options['step']} taken on {target.name}: "
            f"{selectors.describe_flag_change(change)}"
        )
        self._print_flags(target)

    # --- API tokens ----------------------------------------------------------------------------
    def handle_token(self, actor, options):
        getattr(self, f"_token_{options['token_command']}")(actor, options)

    def _token_create(self, actor, options):
        names = [name.strip() for name in options["targets"].split(",") if name.strip()]
        targets = [services.get_target(name) for name in names]
        token, raw = services.create_api_token(actor=actor, name=options["name"], targets=targets)
        # The token alone on stdout (TOKEN=$(ops token create ...)); the rest on stderr.
        self.stdout.write(raw)
        self.stderr.write(
            f"API token {token.prefix} for {token.name}, reading {', '.join(names)}. "
            "It is shown this once and kept only as a hash: store it now "
            "(the application sends it as: Authorization: Bearer TOKEN)."
        )

    def _token_revoke(self, actor, options):
        token = services.revoke_api_token(
            actor=actor, token=services.get_api_token(options["prefix"])
        )
        self.stdout.write(f"API token {token.prefix} ({token.name}) revoked: refused from now on")

    def _token_list(self, actor, options):
        if not actor.has_perm("migrations_ops.view_apitoken"):
            raise services.PermissionDenied(f"{actor.name} is not allowed to list API tokens")
        for token in selectors.api_tokens():
            targets = ",".join(target.name for target in token.targets.all())
            used = f"{token.last_used_at:%Y-%m-%d %H:%M}" if token.last_used_at else "never"
            state = (
                f"revoked {token.revoked_at:%Y-%m-%d %H:%M} by {token.revoked_by_name}"
                if token.revoked_at
                else "active"
            )
            self.stdout.write(
                f"{token.prefix}  {token.name}  targets={targets}  "
                f"created={token.created_at:%Y-%m-%d %H:%M} by {token.created_by_name}  "
                f"last used={used}  {state}"
            )

    def handle_sweep(self, actor, options):
        report = services.sweep_operations(actor=actor)
        for line in report.lines():
            self.stdout.write(line)
        self.stdout.write(
            f"sweep: {len(report.resent)} sent again, {len(report.unsent)} still unsent, "
            f"{len(report.lost)} marked lost"
        )

    def handle_workers(self, actor, options):
        if not actor.has_perm("migrations_ops.view_target"):
            raise CommandError(f"{actor.name} is not allowed to view the console's state")
        liveness = selectors.worker_liveness()
        alive = {worker.hostname for worker in liveness.alive}
        for worker in [] if liveness.in_process else selectors.worker_rows():
            state = (
                "alive"
                if worker.hostname in alive
                else "stopped"
                if worker.stopped_at is not None
                else "silent"
            )
            self.stdout.write(
                f"{worker.hostname}  {state}  queues={','.join(worker.queues)}  "
                f"last seen={worker.last_seen_at:%Y-%m-%d %H:%M:%S} UTC  "
                f"started={worker.started_at:%Y-%m-%d %H:%M:%S} UTC"
            )
        if liveness.status == selectors.CRITICAL:
            raise CommandError(liveness.message)
        self.stdout.write(liveness.message)

    def handle_audit_verify(self, actor, options):
        if not actor.has_perm("migrations_ops.view_auditevent"):
            raise services.PermissionDenied(f"{actor.name} is not allowed to view the audit trail")
        report, problems = selectors.verify_audit_chain()
        if options["start_witness"] and [p.kind for p in problems] == ["unwitnessed"]:
            witnessed = audit_witness.start(AuditEvent)
            self.stdout.write(f"audit witness started at #{witnessed.last_id}")
            report, problems = selectors.verify_audit_chain()
        events = f"{report.count} event{'s' if report.count != 1 else ''}"
        if problems:
            for problem in problems:
                self.stderr.write(problem.message)
            shown = "" if report.problem_count == len(problems) else f", the first {len(problems)}"
            raise CommandError(
                f"audit chain broken: {report.problem_count} problem(s) in {events}{shown} "
                "named above"
            )
        last = f", last #{report.last_id} {report.last_hash}" if report.count else ""
        self.stdout.write(f"audit chain intact: {events}{last}")
        if report.witnessed is not None:
            self.stdout.write(
                f"it passes through #{report.witnessed.last_id}, witnessed "
                f"{report.witnessed.written_at} in {audit_witness.witness_path()}"
            )

    def handle_rotate_secrets(self, actor, options):
        count = services.rotate_target_secrets(actor=actor)
        self.stdout.write(
            f"re-encrypted {count} connection URL{'s' if count != 1 else ''} with the first key "
            "of TARGET_SECRET_KEY: the older keys may now be removed"
        )

    # --- the auto-migrator ----------------------------------------------------------------------
    def handle_automigrate(self, actor, options):
        target = services.get_target(options["target"])
        if options["backoff"] < 0:
            raise CommandError("--backoff cannot be negative")
        reading = self._automigrate_flags(target, options)
        if reading.note:
            self.stderr.write(f"warning: {reading.note}")
        shown = ", ".join(
            f"{name}={selectors.flag_value_text(value)}" for name, value in reading.flags.items()
        )
        self.stdout.write(f"flags of {target.name} ({reading.origin}): {shown}")
        report = services.auto_migrate(
            actor=Actor.auto_migrator(options["app"] or target.name),
            target=target,
            flags=reading.flags,
            backoff_seconds=options["backoff"],
            say=self.stdout.write,
        )
        if not report.ok:
            raise CommandError(report.lines[-1])

    @staticmethod
    def _automigrate_flags(target, options) -> flag_client.FlagReading:
        """From the console over HTTP, or from this host's books; cached the same way."""
        console, token = options["console"], options["token"]
        if console and not token:
            raise CommandError("--console needs --token (or OPSCONSOLE_TOKEN): an API token")
        default_cache = Path(settings.DATA_DIR) / "automigrate" / f"{target.name}.flags.json"
        try:
            if console:
                fetch = flag_client.http_fetcher(console, token, target.name)
                source = flag_client.flags_url(console, target.name)
            else:

                def fetch(etag: str) -> flag_client.Fetched:
                    target.refresh_from_db()
                    return flag_client.Fetched(selectors.flags_of(target))

                source = "local"
            cache = flag_client.FlagCache(
                options["cache_file"] or default_cache, source=source, target=target.name
            )
            return flag_client.read_flags(cache, fetch)
        except flag_client.FlagsUnavailable as error:
            raise CommandError(f"cannot read the flags of {target.name}: {error}") from None

    def handle_drill(self, actor, options):
        action = options["drill_command"]
        if action == "list":
            return self._list_drills()
        target = services.get_target(options["target"])
        if action == "schedule":
            drill = incident_services.schedule_drill(
                actor=actor, kind=options["kind"], target=target, enabled=not options["disable"]
            )
            state = "scheduled" if drill.enabled else "disabled"
            self.stdout.write(f"drill #{drill.pk} {drill}: {state} ({_crontab(drill)})")
            return None
        drill = Drill.objects.filter(kind=options["kind"], target=target).first()
        if drill is None:
            raise CommandError(
                f"no {options['kind']} drill on {target.name}: "
                f"schedule it first (ops drill schedule --kind {options['kind']} "
                f"--target {target.name})"
            )
        run = incident_services.run_drill(actor=actor, drill=drill)
        for line in run.log.splitlines():
            self.stdout.write(f"  {line}")
        for phase in ("detect", "mitigate", "recover"):
            seconds = getattr(run, f"{phase}_seconds")
            shown = "-" if seconds is None else f"{seconds:.3f} s"
            self.stdout.write(f"time to {phase}: {shown}")
        score = {True: "objectives met", False: "objectives missed", None: "not scored"}
        incident = f", drill incident #{run.incident_id}" if run.incident_id else ""
        self.stdout.write(
            f"drill run #{run.pk}: {run.status}, {score[run.met_objectives]}{incident}"
        )
        if run.status != DrillRunStatus.SUCCEEDED:
            raise CommandError(f"drill run #{run.pk} failed: {run.error}")
        return None

    def _list_drills(self):
        states = incident_selectors.drill_states()
        if not states:
            self.stdout.write("no drills (ops drill schedule --kind KIND --target SANDBOX)")
        for state in states:
            drill, run = state.drill, state.last_run
            last = f"#{run.pk} {run.status} {run.started_at:%Y-%m-%d %H:%M} UTC" if run else "never"
            if state.overdue:
                due = "OVERDUE" + (f" since {state.due_since:%Y-%m-%d}" if state.due_since else "")
            else:
                due = f"due {state.due_since:%Y-%m-%d}"
            enabled = "" if drill.enabled else " (disabled)"
            self.stdout.write(
                f"#{drill.pk} {drill.kind} on {drill.target.name}{enabled}: "
                f"{_crontab(drill)}; last run {last}; {due}"
            )

    def handle_demo(self, actor, options):
        result = load_demo(Path(settings.DATA_DIR) / "demo")
        for target in result.targets:
            lock = selectors.describe_lock(selectors.lock_report(target))
            self.stdout.write(f"demo target {target.name}: lock {lock}")
        incident = result.incident
        self.stdout.write(f"open incident #{incident.pk}: {incident.title}")
        self.stdout.write(f"admin login: username {result.username}  password {result.password}")


def _crontab(drill: Drill) -> str:
    task = drill.periodic_task
    if task is None or task.crontab is None:
        return "not scheduled"
    c = task.crontab
    return (
        f"cron {c.minute} {c.hour} {c.day_of_month} {c.month_of_year} {c.day_of_week} {c.timezone}"
    )
