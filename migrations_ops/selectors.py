"""Every read the admin, CLI and API share. Nothing here opens a connection to a target."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db.models import QuerySet
from django.utils import timezone

from migrations_ops.models import AuditEvent, LockObservation, LockState, Operation, Target


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
        "requested_at": iso(operation.requested_at),
        "started_at": iso(operation.started_at),
        "finished_at": iso(operation.finished_at),
        "error": operation.error or None,
        "result": operation.result,
        "log": operation.log.splitlines(),
    }


def operations_for_target(target: Target) -> QuerySet[Operation]:
    return Operation.objects.filter(target=target).order_by("-requested_at", "-id")


def audit_events_for_operation(operation: Operation) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(operation=operation).order_by("created_at", "id")
