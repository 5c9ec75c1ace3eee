"""The operations' subcommands: request one (unlock, up, rollback, …), follow it, approve, sweep."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from django.core.management.base import CommandError

from incidents import services as incident_services
from migrations_ops import selectors, services
from migrations_ops.cli.subcommand import Subcommand
from migrations_ops.models import Operation, OperationStatus

if TYPE_CHECKING:
    from incidents.models import Incident

WAIT_POLL_SECONDS = 0.2


class AwaitingApproval(Exception):
    """The request was taken and now waits for a second person: not an error."""


STILL_RUNNING_EXIT_STATUS = 2


def _operation_arguments(parser) -> None:
    """What every request for an operation on a target takes."""
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


def _migration_flags(parser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="run it and roll back: report what changes"
    )
    parser.add_argument(
        "--non-transactional",
        action="store_true",
        help="allow a migration that cannot run in a transaction (statement by statement)",
    )


def _unlock_arguments(unlock) -> None:
    _operation_arguments(unlock)
    unlock.add_argument("--reason", required=True)
    unlock.add_argument(
        "--force", action="store_true", help="release even a lock younger than its timeout"
    )


def unlock(command, actor, options) -> None:
    target = services.get_target(options["target"])
    operation = services.request_force_unlock(
        actor=actor,
        target=target,
        reason=options["reason"],
        release_fresh=options["force"],
        confirm_name=options["target"],
        incident=_incident(options),
    )
    operation = _follow(command, operation, options["wait"])
    before = operation.result.get("before", {})
    command.stdout.write(
        f"lock released (was held by {before.get('holder') or 'an unnamed holder'}"
        f"{', since ' + before['locked_at'] if before.get('locked_at') else ''})"
    )


def _up_arguments(up) -> None:
    _operation_arguments(up)
    up.add_argument("--to", dest="to_version", metavar="VERSION", help="stop at this version")
    up.add_argument("--reason", default="", help="required unless --dry-run")
    _migration_flags(up)


def up(command, actor, options) -> None:
    operation = services.request_apply(
        actor=actor,
        target=services.get_target(options["target"]),
        reason=options["reason"],
        to_version=options["to_version"],
        dry_run=options["dry_run"],
        non_transactional=options["non_transactional"],
        confirm_name=options["target"],
        incident=_incident(options),
    )
    _print_run(command, _follow(command, operation, options["wait"]))


def _rollback_arguments(rollback) -> None:
    _operation_arguments(rollback)
    rollback.add_argument("--version", help="default: the latest applied")
    rollback.add_argument("--reason", default="", help="required unless --dry-run")
    rollback.add_argument(
        "--out-of-order", action="store_true", help="allow rolling back an older migration"
    )
    _migration_flags(rollback)


def rollback(command, actor, options) -> None:
    operation = services.request_rollback(
        actor=actor,
        target=services.get_target(options["target"]),
        reason=options["reason"],
        version=options["version"],
        dry_run=options["dry_run"],
        out_of_order=options["out_of_order"],
        non_transactional=options["non_transactional"],
        confirm_name=options["target"],
        incident=_incident(options),
    )
    _print_run(command, _follow(command, operation, options["wait"]))


def _verify_arguments(verify) -> None:
    _operation_arguments(verify)
    verify.add_argument("--json", action="store_true", help="machine-readable output")


def verify(command, actor, options) -> None:
    operation = services.request_verify(
        actor=actor,
        target=services.get_target(options["target"]),
        incident=_incident(options),
    )
    operation = _follow(command, operation, options["wait"], quiet=options["json"])
    result = operation.result
    if options["json"]:
        command.stdout.write(json.dumps(result, indent=2))
    else:
        command.stdout.write(
            f"{operation.target.name}: {result['applied']} applied, {result['scripts']} "
            f"script(s), {len(result['problems'])} problem(s)"
        )
    if result["problems"]:
        raise CommandError("\n".join(f"{p['code']}: {p['message']}" for p in result["problems"]))


def _cleanup_arguments(cleanup) -> None:
    _operation_arguments(cleanup)
    cleanup.add_argument("--reason", required=True)


def cleanup(command, actor, options) -> None:
    operation = services.request_cleanup(
        actor=actor,
        target=services.get_target(options["target"]),
        reason=options["reason"],
        confirm_name=options["target"],
        incident=_incident(options),
    )
    operation = _follow(command, operation, options["wait"])
    for change in operation.result["changes"] or ["nothing to clean up"]:
        command.stdout.write(change)


def _mark_arguments(mark) -> None:
    _operation_arguments(mark)
    mark.add_argument("--version", required=True)
    mark.add_argument("--reason", required=True)


def mark_applied(command, actor, options) -> None:
    _mark(command, actor, options, applied=True)


def mark_rolled_back(command, actor, options) -> None:
    _mark(command, actor, options, applied=False)


def _mark(command, actor, options, *, applied: bool) -> None:
    operation = services.request_mark(
        actor=actor,
        target=services.get_target(options["target"]),
        version=options["version"],
        reason=options["reason"],
        applied=applied,
        confirm_name=options["target"],
        incident=_incident(options),
    )
    operation = _follow(command, operation, options["wait"])
    for change in operation.result["changes"]:
        command.stdout.write(change)


def _incident(options) -> Incident | None:
    number = options["incident"]
    return None if number is None else incident_services.get_incident(number)


def _print_run(command, operation: Operation) -> None:
    result = operation.result
    for statement in result["statements"]:
        first_line = statement["sql"].splitlines()[0] if statement["sql"] else ""
        command.stdout.write(
            f"  {statement['migration']} ({statement['direction']}) line "
            f"{statement['line']}: {first_line} [{statement['ms']} ms]"
        )
    for entry in result["books"]:
        command.stdout.write(f"  books: {entry}")
    for change in result["changes"]:
        command.stdout.write(f"  {change['kind']}: {change['object']} ({change['detail']})")
    if result["dry_run"]:
        command.stdout.write("dry run: rolled back, nothing was changed")


def _follow(command, operation: Operation, seconds: float, *, quiet: bool = False) -> Operation:
    """Wait for the operation; a failure or a time-out is an error exit."""
    if not quiet:
        command.stdout.write(
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
        command.stderr.write(f"warning: {warning}")
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
        command.stdout.write(f"operation #{operation.pk} {operation.status}")
    return operation


def _approve_arguments(approve) -> None:
    approve.add_argument("--operation", type=int, required=True)
    approve.add_argument("--reason", default="")
    approve.add_argument("--wait", type=float, default=60, metavar="SECONDS")


def approve(command, actor, options) -> None:
    operation = services.approve_operation(
        actor=actor,
        operation=services.get_operation(options["operation"]),
        reason=options["reason"],
    )
    command.stdout.write(f"operation #{operation.pk} approved by {actor.name}")
    operation = _follow(command, operation, options["wait"], quiet=True)
    command.stdout.write(f"operation #{operation.pk} {operation.status}")


def _reject_arguments(reject) -> None:
    reject.add_argument("--operation", type=int, required=True)
    reject.add_argument("--reason", required=True)


def reject(command, actor, options) -> None:
    operation = services.reject_operation(
        actor=actor,
        operation=services.get_operation(options["operation"]),
        reason=options["reason"],
    )
    command.stdout.write(f"operation #{operation.pk} rejected: {options['reason']}")


def sweep(command, actor, options) -> None:
    report = services.sweep_operations(actor=actor)
    for line in report.lines():
        command.stdout.write(line)
    command.stdout.write(
        f"sweep: {len(report.resent)} sent again, {len(report.unsent)} still unsent, "
        f"{len(report.lost)} marked lost"
    )


def workers(command, actor, options) -> None:
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
        command.stdout.write(
            f"{worker.hostname}  {state}  queues={','.join(worker.queues)}  "
            f"last seen={worker.last_seen_at:%Y-%m-%d %H:%M:%S} UTC  "
            f"started={worker.started_at:%Y-%m-%d %H:%M:%S} UTC"
        )
    if liveness.status == selectors.CRITICAL:
        raise CommandError(liveness.message)
    command.stdout.write(liveness.message)


UNLOCK = Subcommand("unlock", "force-release a target's lock", unlock, _unlock_arguments)
UP = Subcommand("up", "apply pending migrations", up, _up_arguments)
ROLLBACK = Subcommand("rollback", "roll back one migration", rollback, _rollback_arguments)
VERIFY = Subcommand("verify", "compare the books with the scripts", verify, _verify_arguments)
CLEANUP = Subcommand("cleanup", "remove stale locks, repair table", cleanup, _cleanup_arguments)
MARK_APPLIED = Subcommand(
    "mark-applied",
    "record a migration as applied without running SQL",
    mark_applied,
    _mark_arguments,
)
MARK_ROLLED_BACK = Subcommand(
    "mark-rolled-back",
    "remove a migration from the books without running SQL",
    mark_rolled_back,
    _mark_arguments,
)
APPROVE = Subcommand("approve", "approve another person's operation", approve, _approve_arguments)
REJECT = Subcommand("reject", "reject an operation awaiting approval", reject, _reject_arguments)
SWEEP = Subcommand(
    "sweep", "send stuck queued operations again, mark dead workers' operations lost", sweep
)
WORKERS = Subcommand(
    "workers", "the workers last heard from; exit 1 when none of the task queue is alive", workers
)
