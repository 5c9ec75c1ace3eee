"""Every read the admin, CLI and API share. Nothing here opens a connection to a target."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db.models import (
    BooleanField,
    Case,
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    IntegerField,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

from incidents.models import OPEN_STATUSES, Incident, Severity
from migrations_ops import audit_chain, audit_witness
from migrations_ops.models import (
    ACTIVE_STATUSES,
    FLAG_FIELDS,
    ApiToken,
    AuditEvent,
    FlagChange,
    FlagChangeKind,
    FlagStage,
    LockObservation,
    LockState,
    MigrationScript,
    Operation,
    OperationKind,
    OperationStatus,
    Target,
    WorkerHeartbeat,
)
from migrations_ops.models import AlertThresholds as AlertThresholdsRow
from opsconsole.celery import app as celery_app
from opsconsole.spreadsheets import csv_lines


def targets_with_observations() -> QuerySet[Target]:
    return Target.objects.select_related("lock_observation").order_by("name")


def observation_of(target: Target) -> LockObservation | None:
    try:
        return target.lock_observation
    except LockObservation.DoesNotExist:
        return None


def lock_report(target: Target, now: dt.datetime | None = None) -> dict[str, Any]:
    """The lock as last observed, in the words every door uses."""
    now = now or timezone.now()
    observation = observation_of(target)
    if observation is None:
        return {
            "state": LockState.UNKNOWN.value,
            "held": None,
            "holder": None,
            "rows": [],
            "since": None,
            "since_source": None,
            "age_seconds": None,
            "stale": None,
            "lock_timeout_seconds": target.lock_timeout_seconds,
            "observed_at": None,
            "error": "never read",
        }
    state = observation.state(now, target.lock_timeout)
    since = observation.since
    age = observation.age(now)
    return {
        "state": state,
        "held": observation.held,
        "holder": observation.holder or None,
        "rows": observation.rows if observation.held is not None else [],
        "since": since.isoformat() if since else None,
        "since_source": observation.since_source,
        "age_seconds": round(age.total_seconds(), 1) if age is not None else None,
        "stale": state == LockState.STALE if observation.held is not None else None,
        "lock_timeout_seconds": target.lock_timeout_seconds,
        "observed_at": observation.observed_at.isoformat() if observation.observed_at else None,
        "error": observation.error or None,
    }


def describe_lock(report: dict[str, Any]) -> str:
    """One line for humans: "stale: held 20 min by deploy-7f3a (since 11:02:03 UTC)"."""
    if report["state"] == LockState.UNKNOWN:
        return f"unknown: {report['error']}" if report["error"] else "unknown"
    if report["state"] == LockState.FREE:
        return "free"
    age = humanize_seconds(report["age_seconds"])
    holder = f" by {report['holder']}" if report["holder"] else ""
    guessed = (
        " (first seen held; the table keeps no time)"
        if report["since_source"] == "first_seen"
        else ""
    )
    return f"{report['state']}: held {age}{holder}{guessed}"


def humanize_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "for an unknown time"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"


def status_report(target: Target, applied: list | None, error: str | None) -> dict[str, Any]:
    """A target's status as the API and ``ops status --json`` return it (never its URL)."""
    return {
        "name": target.name,
        "environment": target.environment,
        "convention": target.convention,
        "dialect": target.dialect,
        "reachable": error is None,
        "error": error,
        "lock": lock_report(target),
        "applied_migrations": [m.as_dict() for m in applied] if applied is not None else None,
    }


def operation_report(operation: Operation) -> dict[str, Any]:
    """An operation as the API returns it."""

    def iso(value):
        return value.isoformat() if value else None

    return {
        "id": operation.pk,
        "kind": operation.kind,
        "target": operation.target.name,
        "status": operation.status,
        "finished": operation.is_finished,
        "requested_by": operation.requested_by_name,
        "door": operation.door,
        "reason": operation.reason,
        "incident": operation.incident_id,
        "requested_at": iso(operation.requested_at),
        "started_at": iso(operation.started_at),
        "finished_at": iso(operation.finished_at),
        "error": operation.error or None,
        "result": operation.result,
        "log": operation.log.splitlines(),
    }


def flags_of(target: Target) -> dict[str, Any]:
    """The runtime flags an application's auto-migrator obeys, by their runbook names."""
    return {name: getattr(target, field) for name, field in FLAG_FIELDS.items()}


def operations_for_target(target: Target) -> QuerySet[Operation]:
    return Operation.objects.filter(target=target).order_by("-requested_at", "-id")


def audit_events_for_operation(operation: Operation) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(operation=operation).order_by("created_at", "id")


# How many of a broken chain's problems ``ops audit-verify`` names (the walk counts them all).
CHAIN_PROBLEMS_SHOWN = 10


def verify_audit_chain(chunk_size: int = 2000):
    """Walk the whole audit trail in id order, streaming it, then compare its end with the
    witness kept outside the database (``audit_witness``): ``(report, problems)`` with the
    first ``CHAIN_PROBLEMS_SHOWN`` problems; ``report.problem_count`` counts them all."""
    report = audit_chain.ChainReport()
    report.problem_count = 0
    problems = []
    rows = AuditEvent.objects.order_by("id").iterator(chunk_size=chunk_size)
    for problem in audit_chain.walk(rows, report):
        report.problem_count += 1
        if len(problems) < CHAIN_PROBLEMS_SHOWN:
            problems.append(problem)
    # The witness's word on the chain's end, always shown: the walk cannot see a cut end.
    witnessed = audit_witness.check(AuditEvent, count=report.count, last_id=report.last_id)
    report.problem_count += len(witnessed)
    report.witnessed = None if witnessed else audit_witness.read()
    return report, problems + witnessed


def history_of(obj, limit: int = 200) -> list[AuditEvent]:
    """The newest audit events about ``obj`` (its row-level history: who changed which field
    from what to what, when), read with the (object_model, object_id, created_at) index."""
    about = AuditEvent.objects.filter(object_model=obj._meta.label_lower, object_id=obj.pk)
    return list(about.order_by("-created_at", "-id")[:limit])


AUDIT_CSV_HEADER = [
    "id",
    "created_at_utc",
    "user",
    "door",
    "action",
    "target",
    "operation",
    "object",
    "ip",
    "request_id",
    "before",
    "after",
    "details",
    "hash",
]


def audit_events_csv(queryset: QuerySet[AuditEvent], chunk_size: int = 2000) -> Iterator[str]:
    """``queryset`` as CSV lines, read ``chunk_size`` rows at a time (a server-side cursor on
    PostgreSQL): memory stays flat whatever the number of rows."""

    def as_json(value) -> str:
        return json.dumps(value, sort_keys=True, ensure_ascii=False) if value else ""

    rows = (
        [
            event.pk,
            f"{event.created_at.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S.%f}",
            event.actor_name,
            event.door,
            event.action,
            event.target_name,
            event.operation_id or "",
            f"{event.object_model} #{event.object_id}" if event.object_model else "",
            event.ip or "",
            event.request_id,
            as_json(event.before),
            as_json(event.after),
            as_json(event.details),
            event.hash,
        ]
        for event in queryset.select_related(None).iterator(chunk_size=chunk_size)
    )
    return csv_lines(AUDIT_CSV_HEADER, rows)


def field_changes(event: AuditEvent) -> list[tuple[str, Any, Any]]:
    """``(field, before, after)`` of a change event, fields in a stable order."""
    names = sorted(set(event.before) | set(event.after))
    return [(name, event.before.get(name), event.after.get(name)) for name in names]


def latest_dry_run(target: Target, kind: str) -> Operation | None:
    """The newest finished dry run of this kind on the target, to show before the real run."""
    return (
        Operation.objects.filter(target=target, kind=kind, params__dry_run=True)
        .exclude(status__in=["awaiting_approval", "queued", "running"])
        .order_by("-requested_at", "-id")
        .first()
    )


# --- the fleet (admin index) -----------------------------------------------------------------
CRITICAL, WARNING, OK = "critical", "warning", "ok"
HEALTH_ORDER = {CRITICAL: 0, WARNING: 1, OK: 2}
# How far back failures and retries count.
FLEET_WINDOW = dt.timedelta(hours=24)
# "Migrations" for the failure and retry rates: apply and rollback runs that ended (dry runs
# rehearse and are left out); a lost one ended without finishing, so it counts as failed.
MIGRATION_KINDS = (OperationKind.APPLY, OperationKind.ROLLBACK)
ENDED_STATUSES = (OperationStatus.SUCCEEDED, OperationStatus.FAILED, OperationStatus.LOST)
FAILED_STATUSES = (OperationStatus.FAILED, OperationStatus.LOST)


@dataclass(frozen=True)
class AlertThresholds:
    """The runbook's "Alert Thresholds" the fleet view applies (settings ``ALERT_*``)."""

    lock_held_seconds: float
    failure_rate: float
    retry_rate: float

    @classmethod
    def from_settings(cls) -> AlertThresholds:
        return cls(
            lock_held_seconds=settings.ALERT_LOCK_HELD_SECONDS,
            failure_rate=settings.ALERT_FAILURE_RATE,
            retry_rate=settings.ALERT_RETRY_RATE,
        )

    @classmethod
    def current(cls) -> AlertThresholds:
        """As a console admin set them in the admin, else as the settings say."""
        row = AlertThresholdsRow.objects.filter(pk=1).first()
        if row is None:
            return cls.from_settings()
        return cls(row.lock_held_seconds, row.failure_rate, row.retry_rate)

    @property
    def failure_percent(self) -> str:
        return percent(self.failure_rate)

    @property
    def retry_percent(self) -> str:
        return percent(self.retry_rate)


def percent(rate: float) -> str:
    return f"{round(rate * 100, 1):g} %"


def fleet_overview(
    now: dt.datetime | None = None, thresholds: AlertThresholds | None = None
) -> list[dict[str, Any]]:
    """Every target's health for the on-call engineer, worst first (critical, warning, ok; then
    the oldest lock; then the name), from what the console already knows: the last lock
    observation, the imported scripts, the last successful verify (applied and pending as it
    found them: the console keeps no list of applied migrations) and the operations of the
    past 24 h, and the open real incidents (OPEN_STATUSES, drills aside) with the target among
    the affected ones.
    Four queries however many targets there are, and no connection to any target.
    """
    now = now or timezone.now()
    thresholds = thresholds or AlertThresholds.current()
    since = now - FLEET_WINDOW
    newest = Operation.objects.filter(target=OuterRef("pk")).order_by("-requested_at", "-id")
    scripts = (
        MigrationScript.objects.filter(target=OuterRef("pk"))
        .order_by()
        .values("target")
        .annotate(count=Count("pk"))
        .values("count")
    )
    open_incidents = (
        Target.incidents.through.objects.filter(
            target=OuterRef("pk"), incident__status__in=OPEN_STATUSES, incident__is_drill=False
        )
        .order_by()
        .values("target")
        .annotate(count=Count("pk"))
        .values("count")
    )
    targets = list(
        Target.objects.select_related("lock_observation")
        .defer("connection_url")  # a secret, and this page has no use for it
        .annotate(
            script_count=Coalesce(Subquery(scripts, output_field=IntegerField()), 0),
            open_incident_count=Coalesce(Subquery(open_incidents, output_field=IntegerField()), 0),
            last_operation_id=Subquery(newest.values("pk")[:1]),
            last_verify_id=Subquery(
                newest.filter(kind=OperationKind.VERIFY, status=OperationStatus.SUCCEEDED).values(
                    "pk"
                )[:1]
            ),
        )
        .order_by("name")
    )
    if not targets:
        return []
    # Not ~Q(params__dry_run=True): NOT NULL is NULL, which would drop rows without the key.
    not_dry_run = Q(params__dry_run=False) | Q(params__dry_run__isnull=True)
    migrations = Q(kind__in=MIGRATION_KINDS, status__in=ENDED_STATUSES) & not_dry_run
    stats = {
        row["target_id"]: row
        for row in Operation.objects.filter(requested_at__gte=since)
        .order_by()
        .values("target_id")
        .annotate(
            failed=Count("pk", filter=Q(status=OperationStatus.FAILED)),
            migrations=Count("pk", filter=migrations),
            migrations_failed=Count("pk", filter=migrations & Q(status__in=FAILED_STATUSES)),
            migrations_retried=Count("pk", filter=migrations & Q(result__lock_attempts__gt=1)),
        )
    }
    last_operations = (
        Operation.objects.only("pk", "target_id", "kind", "status", "requested_at", "finished_at")
        .order_by()
        .in_bulk([t.last_operation_id for t in targets if t.last_operation_id])
    )
    last_verifies = (
        Operation.objects.only("pk", "target_id", "finished_at", "result")
        .order_by()
        .in_bulk([t.last_verify_id for t in targets if t.last_verify_id])
    )
    rows = [
        _fleet_row(
            target,
            stats.get(target.pk, {}),
            last_operations.get(target.last_operation_id),
            last_verifies.get(target.last_verify_id),
            now,
            thresholds,
        )
        for target in targets
    ]
    rows.sort(
        key=lambda row: (
            HEALTH_ORDER[row["state"]],
            -(row["lock"]["age_seconds"] or -1),
            row["name"],
        )
    )
    return rows


def _fleet_row(
    target: Target,
    stats: dict[str, int],
    last: Operation | None,
    verify: Operation | None,
    now: dt.datetime,
    thresholds: AlertThresholds,
) -> dict[str, Any]:
    lock = lock_report(target, now)
    observation = observation_of(target)
    migrations = stats.get("migrations", 0)
    migrations_failed = stats.get("migrations_failed", 0)
    migrations_retried = stats.get("migrations_retried", 0)
    problems = verify.result.get("problems", []) if verify is not None else []
    checks = health_checks(lock, migrations, migrations_failed, migrations_retried, thresholds)
    state, reasons = worst_state(checks), [check["message"] for check in checks]
    return {
        "id": target.pk,
        "name": target.name,
        "environment": target.environment,
        "environment_label": target.get_environment_display(),
        "state": state,
        "reasons": reasons,
        "checks": checks,
        "lock": lock,
        "lock_text": describe_lock(lock),
        "observed_at": observation.observed_at if observation is not None else None,
        "scripts": target.script_count,
        "applied": verify.result.get("applied") if verify is not None else None,
        "pending": sum(1 for p in problems if p.get("code") == "pending")
        if verify is not None
        else None,
        "verified_at": verify.finished_at if verify is not None else None,
        "failed": stats.get("failed", 0),
        "migrations": migrations,
        "migrations_failed": migrations_failed,
        "migrations_retried": migrations_retried,
        "failure_rate": migrations_failed / migrations if migrations else None,
        "retry_rate": migrations_retried / migrations if migrations else None,
        "last_operation": {
            "id": last.pk,
            "kind": last.kind,
            "kind_label": last.get_kind_display(),
            "status": last.status,
            "status_label": last.get_status_display(),
            "when": last.finished_at or last.requested_at,
        }
        if last is not None
        else None,
        "open_incidents": target.open_incident_count,
    }


def fleet_health(
    lock: dict[str, Any],
    migrations: int,
    migrations_failed: int,
    migrations_retried: int,
    thresholds: AlertThresholds,
) -> tuple[str, list[str]]:
    """Red, amber or green by the runbook's thresholds, and why (critical reasons first)."""
    checks = health_checks(lock, migrations, migrations_failed, migrations_retried, thresholds)
    return worst_state(checks), [check["message"] for check in checks]


def worst_state(checks: list[dict[str, str]]) -> str:
    return min((check["status"] for check in checks), key=HEALTH_ORDER.get, default=OK)


def health_checks(
    lock: dict[str, Any],
    migrations: int,
    migrations_failed: int,
    migrations_retried: int,
    thresholds: AlertThresholds,
) -> list[dict[str, str]]:
    """The runbook's checks a target fails, each named (``lock_unknown``, ``lock_held``,
    ``lock_stale``, ``failure_rate``, ``retry_rate``) with its status and why; critical first."""
    checks = []

    def fail(check: str, status: str, message: str) -> None:
        checks.append({"check": check, "status": status, "message": message})

    age = lock["age_seconds"]
    if lock["state"] == LockState.UNKNOWN:
        fail(
            "lock_unknown",
            WARNING,
            f"lock state unknown: {lock['error']}" if lock["error"] else "lock state unknown",
        )
    elif lock["held"] and age is None:
        fail("lock_held", WARNING, "lock held for an unknown time")
    elif lock["held"] and age > thresholds.lock_held_seconds:
        fail(
            "lock_held",
            CRITICAL,
            f"lock held {humanize_seconds(age)} (over {thresholds.lock_held_seconds:g} s)",
        )
    elif lock["state"] == LockState.STALE:
        fail(
            "lock_stale",
            CRITICAL,
            f"lock stale: held {humanize_seconds(age)} "
            f"(over its {lock['lock_timeout_seconds']} s timeout)",
        )
    if migrations:
        rate = migrations_failed / migrations
        if rate > thresholds.failure_rate:
            fail(
                "failure_rate",
                CRITICAL,
                f"{migrations_failed} of {migrations} migrations failed in 24 h "
                f"({percent(rate)}, over {thresholds.failure_percent})",
            )
        rate = migrations_retried / migrations
        if rate > thresholds.retry_rate:
            fail(
                "retry_rate",
                WARNING,
                f"{migrations_retried} of {migrations} migrations retried for the lock in 24 h "
                f"({percent(rate)}, over {thresholds.retry_percent})",
            )
    checks.sort(key=lambda check: HEALTH_ORDER[check["status"]])
    return checks


# --- worker liveness ---------------------------------------------------------------------------
# Rows read at most: a fleet of workers is a handful; more is old rows of renamed workers.
WORKER_ROWS_READ = 200


@dataclass(frozen=True)
class WorkerLiveness:
    """Whether a worker of the console's task queue has been seen alive within
    WORKER_SEEN_WITHIN seconds (models.WorkerHeartbeat). With tasks run in-process
    (CELERY_TASK_ALWAYS_EAGER) there is no worker to see, and none is missed."""

    in_process: bool
    queue: str
    seen_within: int
    alive: list[WorkerHeartbeat]
    last_seen: WorkerHeartbeat | None  # the queue's worker heard from last, alive or not
    checked_at: dt.datetime

    @property
    def status(self) -> str:
        return OK if self.in_process or self.alive else CRITICAL

    @property
    def last_seen_seconds(self) -> float | None:
        if self.last_seen is None:
            return None
        return max(0.0, (self.checked_at - self.last_seen.last_seen_at).total_seconds())

    @property
    def message(self) -> str:
        return self.describe(names=True)

    def describe(self, *, names: bool) -> str:
        """One line for people; ``names=False`` leaves the workers' host names out (the API:
        an application's token has no business knowing the console's hosts)."""
        if self.in_process:
            return (
                "tasks run in the console's own processes (CELERY_TASK_ALWAYS_EAGER): "
                "no worker is needed"
            )
        queue = f"queue {self.queue!r}"
        if self.alive:
            alive = f"{len(self.alive)} worker(s) of {queue} alive"
            return f"{alive}: {', '.join(w.hostname for w in self.alive)}" if names else alive
        consequence = (
            f"operations stay queued and nothing runs them; start a worker (make worker) on {queue}"
        )
        last = self.last_seen
        if last is None:
            return f"no worker of {queue} has ever been seen: {consequence}"
        who = last.hostname if names else "the last one"
        how = "stopped" if last.stopped_at is not None else "last seen"
        when = f"{last.last_seen_at:%Y-%m-%d %H:%M:%S} UTC"
        return (
            f"no worker of {queue} seen within {self.seen_within} s: {who} {how} "
            f"{humanize_seconds(self.last_seen_seconds)} ago ({when}); {consequence}"
        )

    def as_dict(self) -> dict[str, Any]:
        """For the API: counts and times, no host names."""
        last = self.last_seen
        return {
            "status": self.status,
            "in_process": self.in_process,
            "queue": self.queue,
            "seen_within_seconds": self.seen_within,
            "alive": len(self.alive),
            "last_seen_at": last.last_seen_at.isoformat() if last else None,
            "last_seen_seconds": self.last_seen_seconds,
            "message": self.describe(names=False),
        }


def worker_rows() -> list[WorkerHeartbeat]:
    """Every worker the console has heard from (the last week), newest first."""
    return list(WorkerHeartbeat.objects.all()[:WORKER_ROWS_READ])


def worker_liveness(now: dt.datetime | None = None) -> WorkerLiveness:
    """One query (none with tasks run in-process)."""
    now = now or timezone.now()
    # As Celery is configured (CELERY_TASK_DEFAULT_QUEUE, CELERY_TASK_ALWAYS_EAGER).
    queue = celery_app.conf.task_default_queue
    in_process = bool(celery_app.conf.task_always_eager)
    rows = [] if in_process else worker_rows()
    of_queue = [row for row in rows if queue in row.queues]
    since = now - dt.timedelta(seconds=settings.WORKER_SEEN_WITHIN)
    return WorkerLiveness(
        in_process=in_process,
        queue=queue,
        seen_within=settings.WORKER_SEEN_WITHIN,
        alive=[row for row in of_queue if row.stopped_at is None and row.last_seen_at >= since],
        last_seen=of_queue[0] if of_queue else None,  # rows come newest first
        checked_at=now,
    )


BROKER_DOWN_WARNING = (
    "the task broker could not be reached: the operation stays queued and the sweeper sends it "
    "once the broker is back"
)


def broker_down_warning(operation: Operation) -> str | None:
    """Said to whoever just asked, when the task could not be handed to the broker."""
    if operation.status != "queued":
        return None
    failed = AuditEvent.objects.filter(operation=operation, action="operation.send_failed")
    return BROKER_DOWN_WARNING if failed.exists() else None


# --- runtime flags ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ReenableStep:
    """One step of the runbook's "Progressive Re-enable": taken only from ``requires``."""

    number: int
    label: str
    sets: dict[str, Any]
    requires: str
    stage_after: str
    kind: str


# The runbook's "Quick Disable" and its three re-enable steps, flag by flag. Step 2 leaves
# MIGRATION_DRY_RUN as step 1 set it: the runbook turns dry run off only in step 3.
QUICK_DISABLE = {"AUTO_MIGRATE": False, "MIGRATION_DRY_RUN": True, "MIGRATION_MAX_RETRIES": 0}
REENABLE_STEPS = {
    1: ReenableStep(
        1,
        "Dry run mode",
        {"MIGRATION_DRY_RUN": True, "AUTO_MIGRATE": True},
        FlagStage.DISABLED,
        FlagStage.DRY_RUN,
        FlagChangeKind.REENABLE_DRY_RUN,
    ),
    2: ReenableStep(
        2,
        "Limited rollout",
        # The reading of the runbook: dry run on -> limited retries -> full. Migrations
        # run for real from here, with one retry; step 3 restores the usual retries.
        {"AUTO_MIGRATE": True, "MIGRATION_DRY_RUN": False, "MIGRATION_MAX_RETRIES": 1},
        FlagStage.DRY_RUN,
        FlagStage.LIMITED,
        FlagChangeKind.REENABLE_LIMITED,
    ),
    3: ReenableStep(
        3,
        "Full enable",
        {"AUTO_MIGRATE": True, "MIGRATION_DRY_RUN": False, "MIGRATION_MAX_RETRIES": 3},
        FlagStage.LIMITED,
        FlagStage.NORMAL,
        FlagChangeKind.REENABLE_FULL,
    ),
}


def next_reenable_step(target: Target) -> int | None:
    """The re-enable step due on ``target``; None when it is not being re-enabled."""
    for step in REENABLE_STEPS.values():
        if step.requires == target.flag_stage:
            return step.number
    return None


def reenable_progress(target: Target) -> list[dict[str, Any]]:
    """The three steps with their state on ``target``: done, next, not yet (or not needed when
    the target is not emergency-disabled)."""
    due = next_reenable_step(target)
    rows = []
    for step in REENABLE_STEPS.values():
        if due is None:
            state = "not needed"
        elif step.number < due:
            state = "done"
        elif step.number == due:
            state = "next"
        else:
            state = "not yet"
        rows.append({"step": step, "state": state, "sets": describe_flags(step.sets)})
    return rows


def flag_history(target: Target) -> QuerySet[FlagChange]:
    return FlagChange.objects.filter(target=target).order_by("-changed_at", "-id")


def flag_value_text(value: Any) -> str:
    """A flag's value as the runbook writes it: ``true``/``false`` or the number."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def describe_flags(values: dict[str, Any]) -> str:
    return ", ".join(f"{name}={flag_value_text(value)}" for name, value in values.items())


def describe_flag_change(change: FlagChange) -> str:
    """``AUTO_MIGRATE true → false, MIGRATION_MAX_RETRIES 3 → 0`` (or the stage move alone)."""
    parts = [
        f"{name} {flag_value_text(change.before.get(name))} → {flag_value_text(value)}"
        for name, value in change.after.items()
    ]
    if change.stage_before != change.stage_after:
        parts.append(
            f"stage {FlagStage(change.stage_before).label} → {FlagStage(change.stage_after).label}"
        )
    return ", ".join(parts) or "no flag changed"


# --- metrics (GET /metrics) --------------------------------------------------------------------

# Statuses an operation never leaves: counted as Prometheus counters, since they only grow.
FINAL_STATUSES = (
    OperationStatus.SUCCEEDED,
    OperationStatus.FAILED,
    OperationStatus.LOST,
    OperationStatus.CANCELLED,
)
# Upper bounds (seconds) of the operation duration histogram's buckets.
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass(frozen=True)
class MetricsSnapshot:
    """What ``/metrics`` shows, read from the console's database in a fixed number of queries."""

    targets: list[Target]  # with their flags, by name
    fleet: list[dict[str, Any]]  # fleet_overview rows of these targets
    final_operations: list[dict[str, Any]]  # target_id, kind, status, dry_run, count, retried
    active_operations: list[dict[str, Any]]  # target_id, kind, status, count
    durations: list[dict[str, Any]]  # target_id, kind, count, total, le_0 ... le_N
    open_incidents: dict[str, int]  # severity → count, every severity present


def metrics_snapshot(
    target_ids: frozenset[int] | None = None, now: dt.datetime | None = None
) -> MetricsSnapshot:
    """The figures Prometheus scrapes, for every target or only ``target_ids`` (an API token's
    scope). Open incidents are the real ones (drills left out); a token sees those touching
    its targets. Nine queries at most, however many targets and operations there are."""
    now = now or timezone.now()
    targets = Target.objects.only("id", "name", "flag_stage", *FLAG_FIELDS.values())
    operations = Operation.objects.order_by()
    incidents = Incident.objects.filter(status__in=OPEN_STATUSES, is_drill=False)
    if target_ids is not None:
        targets = targets.filter(pk__in=target_ids)
        operations = operations.filter(target_id__in=target_ids)
        incidents = incidents.filter(affected_targets__in=target_ids)
    targets = list(targets.order_by("name"))
    shown = {target.pk for target in targets}
    # The thresholds only colour the fleet rows, which metrics do not use: no need to read them.
    fleet = [
        row for row in fleet_overview(now, AlertThresholds.from_settings()) if row["id"] in shown
    ]
    dry_run = Case(
        When(params__dry_run=True, then=Value(True)),
        default=Value(False),
        output_field=BooleanField(),
    )
    final_operations = list(
        operations.filter(status__in=FINAL_STATUSES)
        .annotate(dry_run=dry_run)
        .values("target_id", "kind", "status", "dry_run")
        .annotate(count=Count("pk"), retried=Count("pk", filter=Q(result__lock_attempts__gt=1)))
    )
    active_operations = list(
        operations.filter(status__in=ACTIVE_STATUSES)
        .values("target_id", "kind", "status")
        .annotate(count=Count("pk"))
    )
    duration = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    buckets = {
        f"le_{index}": Count("pk", filter=Q(duration__lte=dt.timedelta(seconds=bound)))
        for index, bound in enumerate(DURATION_BUCKETS)
    }
    durations = list(
        operations.filter(started_at__isnull=False, finished_at__isnull=False)
        .annotate(duration=duration)
        .values("target_id", "kind")
        .annotate(count=Count("pk"), total=Sum("duration"), **buckets)
    )
    open_incidents = dict.fromkeys(Severity.values, 0)
    for severity, count in (
        incidents.order_by().values("severity").annotate(count=Count("pk", distinct=True))
    ).values_list("severity", "count"):
        open_incidents[severity] = count
    return MetricsSnapshot(
        targets=targets,
        fleet=fleet,
        final_operations=final_operations,
        active_operations=active_operations,
        durations=durations,
        open_incidents=open_incidents,
    )


def api_tokens() -> QuerySet[ApiToken]:
    """Every API token, active ones first; lists name a token by its prefix, never its hash."""
    return ApiToken.objects.prefetch_related("targets").order_by(
        F("revoked_at").desc(nulls_first=True), "name", "prefix"
    )
