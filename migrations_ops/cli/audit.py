"""``ops audit-verify``: walk the audit trail's hash chain and compare it with its witness."""

from __future__ import annotations

from django.core.management.base import CommandError

from migrations_ops import audit_witness, selectors, services
from migrations_ops.cli.subcommand import Subcommand
from migrations_ops.models import AuditEvent


def _audit_verify_arguments(audit_verify) -> None:
    audit_verify.add_argument(
        "--start-witness",
        action="store_true",
        help="where there is no witness yet (a console upgraded to it), start one at the "
        "chain's end once the chain verifies",
    )


def audit_verify(command, actor, options) -> None:
    if not actor.has_perm("migrations_ops.view_auditevent"):
        raise services.PermissionDenied(f"{actor.name} is not allowed to view the audit trail")
    report, problems = selectors.verify_audit_chain()
    if options["start_witness"] and [p.kind for p in problems] == ["unwitnessed"]:
        witnessed = audit_witness.start(AuditEvent)
        command.stdout.write(f"audit witness started at #{witnessed.last_id}")
        report, problems = selectors.verify_audit_chain()
    events = f"{report.count} event{'s' if report.count != 1 else ''}"
    if problems:
        for problem in problems:
            command.stderr.write(problem.message)
        shown = "" if report.problem_count == len(problems) else f", the first {len(problems)}"
        raise CommandError(
            f"audit chain broken: {report.problem_count} problem(s) in {events}{shown} named above"
        )
    last = f", last #{report.last_id} {report.last_hash}" if report.count else ""
    command.stdout.write(f"audit chain intact: {events}{last}")
    if report.witnessed is not None:
        command.stdout.write(
            f"it passes through #{report.witnessed.last_id}, witnessed "
            f"{report.witnessed.written_at} in {audit_witness.witness_path()}"
        )


AUDIT_VERIFY = Subcommand(
    "audit-verify",
    "walk the audit trail's hash chain: name the first event altered, inserted or "
    "removed; compare its end with the witness kept outside the database",
    audit_verify,
    _audit_verify_arguments,
)
