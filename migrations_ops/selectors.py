"""Every read the admin, CLI and API share. Nothing here opens a connection to a target."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db.models import Count, IntegerField, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from incidents.models import OPEN_STATUSES
from migrations_ops.models import (
    FLAG_FIELDS,
    AuditEvent,
    LockObservation,
    LockState,
    MigrationScript,
    Operation,
    OperationKind,
    OperationStatus,
    Target,
)
from migrations_ops.models import AlertThresholds as AlertThresholdsRow


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
    past 24 h, and the open incidents (OPEN_STATUSES) with the target among the affected ones.
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
            target=OuterRef("pk"), incident__status__in=OPEN_STATUSES
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
    state, reasons = fleet_health(
        lock, migrations, migrations_failed, migrations_retried, thresholds
    )
    return {
        "id": target.pk,
        "name": target.name,
        "environment": target.environment,
        "environment_label": target.get_environment_display(),
        "state": state,
        "reasons": reasons,
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
    critical, warning = [], []
    age = lock["age_seconds"]
    if lock["state"] == LockState.UNKNOWN:
        warning.append(
            f"lock state unknown: {lock['error']}" if lock["error"] else "lock state unknown"
        )
    elif lock["held"] and age is None:
        warning.append("lock held for an unknown time")
    elif lock["held"] and age > thresholds.lock_held_seconds:
        critical.append(
            f"lock held {humanize_seconds(age)} (over {thresholds.lock_held_seconds:g} s)"
        )
    elif lock["state"] == LockState.STALE:
        critical.append(
            f"lock stale: held {humanize_seconds(age)} "
            f"(over its {lock['lock_timeout_seconds']} s timeout)"
        )
    if migrations:
        rate = migrations_failed / migrations
        if rate > thresholds.failure_rate:
            critical.append(
                f"{migrations_failed} of {migrations} migrations failed in 24 h "
                f"({percent(rate)}, over {thresholds.failure_percent})"
            )
        rate = migrations_retried / migrations
        if rate > thresholds.retry_rate:
            warning.append(
                f"{migrations_retried} of {migrations} migrations retried for the lock in 24 h "
                f"({percent(rate)}, over {thresholds.retry_percent})"
            )
    state = CRITICAL if critical else WARNING if warning else OK
    return state, critical + warning


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
