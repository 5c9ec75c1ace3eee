"""The sweeper: the outbox's other half (re-sends what waits) and the dead-worker detector."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction
from django.db.models import Max, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from migrations_ops.actors import Actor
from migrations_ops.models import Operation, OperationStatus
from migrations_ops.services.audit import record_audit_event
from migrations_ops.services.execution import (
    LOCK_TAKING_KINDS,
    _append_log,
    _lock_left_by,
    send_operation,
)
from migrations_ops.services.requests import expire_approval_requests


@dataclass
class LostOperation:
    operation_id: int
    kind: str
    target: str
    worker: str
    last_heard_at: dt.datetime
    # "ours", "maybe_ours" (a lock table that names no holder), "other", "free", "unknown"
    # (unreadable), or "" for a kind that takes no lock.
    lock: str
    lock_note: str

    def as_dict(self) -> dict:
        return {
            "operation": self.operation_id,
            "kind": self.kind,
            "target": self.target,
            "worker": self.worker,
            "last_heard_at": self.last_heard_at.isoformat(),
            "lock": self.lock,
            "lock_note": self.lock_note,
        }


@dataclass
class SweepReport:
    """What one sweep did: operations sent again, those the broker still refused, and those
    whose worker fell silent, marked lost."""

    resent: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)
    lost: list[LostOperation] = field(default_factory=list)
    expired: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "resent": self.resent,
            "unsent": self.unsent,
            "lost": [lost.as_dict() for lost in self.lost],
            "expired": self.expired,
        }

    def lines(self) -> list[str]:
        lines = [f"operation #{pk}: still queued, sent again" for pk in self.resent]
        lines += [
            f"operation #{pk}: not approved within {settings.OPERATION_APPROVAL_TTL} s, expired"
            for pk in self.expired
        ]
        lines += [
            f"operation #{pk}: still queued, the task broker is unreachable" for pk in self.unsent
        ]
        for lost in self.lost:
            note = f"; {lost.lock_note}" if lost.lock_note else ""
            lines.append(
                f"operation #{lost.operation_id} ({lost.kind} on {lost.target}): marked lost, "
                f"no heartbeat from {lost.worker or 'its worker'} since "
                f"{lost.last_heard_at:%Y-%m-%d %H:%M:%S} UTC{note}"
            )
        return lines


def sweep_operations(now: dt.datetime | None = None, *, actor: Actor | None = None) -> SweepReport:
    """Run periodically (the ``migrations_ops.sweep_operations`` task, which ``make beat``
    runs in beat's own process, so it needs no worker: opsconsole/beat.py) or by hand (``ops
    sweep``). Two sweeps at once (two beats) are harmless: marking lost and expiring are
    conditional updates, which one of them wins; sending twice is a duplicate message.

    - an operation queued longer than OUTBOX_RESEND_AFTER seconds (its task never sent, or lost
      by the broker) is sent again, at most once per that many seconds: a duplicate is harmless,
      the claim being a conditional update;
    - a running operation not heard from (heartbeat) for OPERATION_LOST_AFTER seconds is marked
      lost, if it is still running with that same heartbeat, and the target's lock is read: a
      lock it left held is reported, for a person to force-release. Nothing is re-run: what a
      dead worker did to the target is for a person to check;
    - a request awaiting approval longer than OPERATION_APPROVAL_TTL seconds expires.
    """
    now = now or timezone.now()
    actor = actor or Actor.sweeper()
    report = SweepReport()
    report.expired = expire_approval_requests(now)
    _resend_queued(now, actor, report)
    _mark_lost(now, actor, report)
    return report


def _resend_queued(now: dt.datetime, actor: Actor, report: SweepReport) -> None:
    deadline = now - dt.timedelta(seconds=settings.OUTBOX_RESEND_AFTER)
    waiting = (
        Operation.objects.filter(status=OperationStatus.QUEUED)
        .annotate(
            # queued when requested, or when approved
            queued_at=Coalesce("decided_at", "requested_at"),
            resent_at=Max(
                "audit_events__created_at", filter=Q(audit_events__action="operation.resent")
            ),
        )
        .filter(queued_at__lt=deadline)
        .filter(Q(resent_at__isnull=True) | Q(resent_at__lt=deadline))
        .select_related("target")
        .order_by("pk")
    )
    for operation in waiting:
        waited = int((now - operation.queued_at).total_seconds())
        _append_log(operation.pk, f"still queued after {waited} s: {actor.name} sends it again")
        if not send_operation(operation.pk):
            report.unsent.append(operation.pk)
            continue
        record_audit_event(
            actor,
            "operation.resent",
            target=operation.target,
            operation=operation,
            details={"queued_at": operation.queued_at.isoformat(), "waited_seconds": waited},
        )
        report.resent.append(operation.pk)


def _mark_lost(now: dt.datetime, actor: Actor, report: SweepReport) -> None:
    deadline = now - dt.timedelta(seconds=settings.OPERATION_LOST_AFTER)
    silent = (
        Operation.objects.filter(status=OperationStatus.RUNNING)
        .annotate(last_heard_at=Coalesce("heartbeat_at", "started_at", "requested_at"))
        .filter(last_heard_at__lt=deadline)
        .select_related("target")
        .order_by("pk")
    )
    for operation in silent:
        last_heard_at = operation.last_heard_at
        lock, lock_note = (
            _lock_left_by(operation) if operation.kind in LOCK_TAKING_KINDS else ("", "")
        )
        error = (
            f"lost: no heartbeat from {operation.worker or 'its worker'} since "
            f"{last_heard_at:%Y-%m-%d %H:%M:%S} UTC ({int((now - last_heard_at).total_seconds())} "
            f"s, more than OPERATION_LOST_AFTER = {settings.OPERATION_LOST_AFTER} s): the worker "
            "died or was cut off mid-run; what it had not committed on the target is rolled back "
            "there. Check the target before asking again"
        )
        with transaction.atomic():
            marked = Operation.objects.filter(
                pk=operation.pk,
                status=OperationStatus.RUNNING,
                heartbeat_at=operation.heartbeat_at,  # None: IS NULL
            ).update(status=OperationStatus.LOST, finished_at=now, error=error)
            if not marked:
                continue  # it beat, or finished, since it was read: alive after all
            _append_log(operation.pk, f"marked lost by {actor.name}: {error}")
            if lock_note:
                _append_log(operation.pk, lock_note)
            record_audit_event(
                actor,
                "operation.lost",
                target=operation.target,
                operation=operation,
                details={
                    "kind": operation.kind,
                    "worker": operation.worker,
                    "last_heard_at": last_heard_at.isoformat(),
                    "lock": lock,
                    "lock_note": lock_note,
                },
            )
        report.lost.append(
            LostOperation(
                operation_id=operation.pk,
                kind=operation.kind,
                target=operation.target.name,
                worker=operation.worker,
                last_heard_at=last_heard_at,
                lock=lock,
                lock_note=lock_note,
            )
        )
