"""The auto-migrator an application runs at start-up (``ops automigrate``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from migrations_ops import engine
from migrations_ops.actors import Actor
from migrations_ops.models import (
    ACTIVE_STATUSES,
    FLAG_FIELDS,
    Operation,
    OperationKind,
    OperationStatus,
    Target,
)
from migrations_ops.services.errors import InvalidRequest, OperationInProgress, ServiceError
from migrations_ops.services.execution import _wait_for, run_in_this_process
from migrations_ops.services.requests import _live_books, _plan_error, needs_approval, request_apply
from migrations_ops.services.scripts import _no_scripts_hint, script_summaries

# What an application runs at start-up (``ops automigrate``): obey the flags, then apply what
# is pending, each attempt an operation of its own, run in the application's own process.
AUTO_MIGRATE_BACKOFF_SECONDS = 1.0
AUTO_MIGRATE_MAX_BACKOFF_SECONDS = 30.0


class AutoMigrateOutcome:
    BYPASS = "bypass"
    DISABLED = "disabled"
    UP_TO_DATE = "up_to_date"
    PREVIEWED = "previewed"
    APPLIED = "applied"
    FAILED = "failed"


@dataclass
class AutoMigrateReport:
    target: str
    outcome: str = ""
    lines: list[str] = field(default_factory=list)
    operations: list[int] = field(default_factory=list)  # ours: one per attempt
    waited_for: list[int] = field(default_factory=list)  # other migrators' operations

    @property
    def ok(self) -> bool:
        return self.outcome != AutoMigrateOutcome.FAILED


def auto_migrate(
    *,
    actor: Actor,
    target: Target,
    flags: dict,
    reason: str = "",
    backoff_seconds: float = AUTO_MIGRATE_BACKOFF_SECONDS,
    say=None,
) -> AutoMigrateReport:
    """Decide from ``flags`` (runbook names, as ``selectors.flags_of`` gives them) and migrate.

    EMERGENCY_BYPASS skips everything; AUTO_MIGRATE off does nothing; MIGRATION_DRY_RUN only
    previews. Otherwise up to 1 + MIGRATION_MAX_RETRIES attempts, each an apply operation
    waiting MIGRATION_LOCK_TIMEOUT seconds for the lock once. When another migrator's operation
    is active on the target, wait for it and look again: usually it has applied everything.
    ``say`` receives each line as it happens (the report keeps them all)."""
    missing = [name for name in FLAG_FIELDS if name not in flags]
    if missing:
        raise InvalidRequest(f"the flags of {target.name} lack {', '.join(missing)}")
    report = AutoMigrateReport(target=target.name)

    def tell(line: str) -> None:
        report.lines.append(line)
        if say is not None:
            say(line)

    if flags["EMERGENCY_BYPASS"]:
        report.outcome = AutoMigrateOutcome.BYPASS
        tell("bypass: migration logic skipped")
        return report
    if not flags["AUTO_MIGRATE"]:
        report.outcome = AutoMigrateOutcome.DISABLED
        tell("auto-migration disabled")
        return report
    dry_run = bool(flags["MIGRATION_DRY_RUN"])
    lock_timeout = int(flags["MIGRATION_LOCK_TIMEOUT"])
    attempts = 1 + int(flags["MIGRATION_MAX_RETRIES"])
    reason = (reason or "").strip() or f"auto-migration by {actor.name}"
    started = timezone.now()
    # Waiting for another migrator spends no attempt, but no more time than our attempts could.
    wait_deadline = time.monotonic() + lock_timeout * attempts
    attempt = 0
    last_error = ""
    while attempt < attempts:
        pending = _auto_pending(target)
        if not pending:
            return _auto_up_to_date(report, target, started, tell)
        if not report.operations and not report.waited_for:
            tell(f"pending on {target.name}: {', '.join(pending)}")
        if not dry_run and needs_approval(actor, target, OperationKind.APPLY, {}):
            raise InvalidRequest(
                f"{target.name} requires approval by a second person for every change: an "
                "application cannot approve its own migrations; have them applied from the "
                f"console (ops up --target {target.name}) and approved there"
            )
        try:
            operation = _request_auto_attempt(
                actor, target, reason, dry_run, lock_timeout, attempt + 1, attempts
            )
        except OperationInProgress as busy:
            if time.monotonic() >= wait_deadline:
                last_error = str(busy)
                break
            tell(
                f"operation #{busy.operation_id} is in progress on {target.name}: waiting for it "
                f"(up to {lock_timeout} s)"
            )
            if busy.operation_id not in report.waited_for:
                report.waited_for.append(busy.operation_id)
            _wait_for(busy.operation_id, min(lock_timeout, wait_deadline - time.monotonic()))
            continue
        except ServiceError:
            if not _auto_pending(target):  # another migrator applied it meanwhile
                return _auto_up_to_date(report, target, started, tell)
            raise
        attempt += 1
        report.operations.append(operation.pk)
        operation = run_in_this_process(operation, worker="automigrate")
        if operation.status == OperationStatus.SUCCEEDED:
            return _auto_succeeded(report, operation, tell)
        last_error = operation.error or operation.status
        tell(f"attempt {attempt} of {attempts} failed: operation #{operation.pk}: {last_error}")
        if attempt < attempts:
            time.sleep(min(backoff_seconds * 2 ** (attempt - 1), AUTO_MIGRATE_MAX_BACKOFF_SECONDS))
    if not _auto_pending(target):
        return _auto_up_to_date(report, target, started, tell)
    report.outcome = AutoMigrateOutcome.FAILED
    what = "preview" if dry_run else "auto-migration"
    if report.operations:
        ours = ", ".join(f"#{pk}" for pk in report.operations)
        tell(f"{what} of {target.name} failed after {attempt} attempt(s) ({ours}): {last_error}")
    else:
        tell(f"{what} of {target.name} gave up waiting: {last_error}")
    return report


def _auto_pending(target: Target) -> list[str]:
    scripts = script_summaries(target)
    if not scripts:
        raise ServiceError(_no_scripts_hint(target))
    try:
        with _live_books(target) as books:
            return [s.filename for s in engine.plan.pending(books.applied, scripts)]
    except engine.EngineError as error:
        raise _plan_error(target, error) from None


def _request_auto_attempt(
    actor: Actor,
    target: Target,
    reason: str,
    dry_run: bool,
    lock_timeout: int,
    attempt: int,
    attempts: int,
) -> Operation:
    # One transaction, so the operation is sent (on commit) already carrying its lock
    # settings: one wait of the flags' lock timeout, retries being operations of their own.
    with transaction.atomic():
        operation = request_apply(
            actor=actor,
            target=target,
            reason=reason if attempts == 1 else f"{reason} (attempt {attempt} of {attempts})",
            dry_run=dry_run,
            confirm_name=target.name,
        )
        operation.params = {
            **operation.params,
            "lock_wait_seconds": lock_timeout,
            "lock_retries": 0,
            "auto_migrate": {"attempt": attempt, "attempts": attempts},
        }
        Operation.objects.filter(pk=operation.pk).update(params=operation.params)
    return operation


def _auto_up_to_date(report: AutoMigrateReport, target: Target, started, tell) -> AutoMigrateReport:
    report.outcome = AutoMigrateOutcome.UP_TO_DATE
    # The books can show another migrator's work a moment before its operation is recorded
    # as finished: name that operation once it is.
    by_another = (
        Operation.objects.filter(target=target, kind=OperationKind.APPLY)
        .filter(
            Q(status__in=ACTIVE_STATUSES)
            | Q(status=OperationStatus.SUCCEEDED, finished_at__gte=started)
        )
        .exclude(params__dry_run=True)
        .exclude(pk__in=report.operations)
        .order_by("-requested_at", "-id")
        .first()
    )
    if by_another is not None and not by_another.is_finished:
        _wait_for(by_another.pk, target.lock_timeout_seconds)
        by_another.refresh_from_db()
    if by_another is not None and by_another.status == OperationStatus.SUCCEEDED:
        tell(f"already applied by operation #{by_another.pk} ({by_another.requested_by_name})")
    else:
        tell(f"nothing to apply on {target.name}: every imported script is applied")
    return report


def _auto_succeeded(report: AutoMigrateReport, operation: Operation, tell) -> AutoMigrateReport:
    result = operation.result
    migrations = ", ".join(operation.params.get("migrations", []))
    if operation.params.get("dry_run"):
        report.outcome = AutoMigrateOutcome.PREVIEWED
        tell(f"dry run (operation #{operation.pk}): would apply {migrations}")
        for change in result.get("changes", []):
            tell(f"  {change['kind']}: {change['object']} ({change['detail']})")
        tell("dry run: rolled back, nothing was changed")
    else:
        report.outcome = AutoMigrateOutcome.APPLIED
        for entry in result.get("books", []):
            tell(f"  books: {entry}")
        tell(f"applied {migrations} (operation #{operation.pk})")
    return report
