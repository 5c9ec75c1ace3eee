"""Every write to incidents and their timelines. Errors meant for the user are
``migrations_ops.services.ServiceError`` with a one-line message, as everywhere else."""

from __future__ import annotations

import datetime as dt
import json

from django.db import transaction
from django.utils import timezone

from incidents.models import (
    AUTOMATIC_CHECKS,
    CHECKLIST_KEYS,
    OPEN_STATUSES,
    STATUS_ORDER,
    TIMESTAMPS,
    ChecklistItem,
    ChecklistKey,
    CheckResult,
    EntryKind,
    EscalationLevel,
    Incident,
    IncidentStatus,
    RecoveryObjective,
    Scenario,
    Severity,
    TimelineEntry,
)
from migrations_ops import engine
from migrations_ops import services as ops
from migrations_ops.actors import Actor
from migrations_ops.models import Operation, Target
from migrations_ops.services import InvalidRequest, require_permission

OPEN_PERMISSION = "incidents.add_incident"
CHANGE_PERMISSION = "incidents.change_incident"

TIMESTAMP_LABELS = {
    "impact_started": "impact started",
    "detected": "detected",
    "mitigated": "mitigated",
    "recovered": "recovered",
}


def utc(moment: dt.datetime | None) -> str:
    if moment is None:
        return "unset"
    return f"{moment.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC"


def add_entry(
    incident: Incident,
    kind: str,
    text: str,
    *,
    actor: Actor | None = None,
    actor_name: str = "",
    operation: Operation | None = None,
    corrects: TimelineEntry | None = None,
    details: dict | None = None,
) -> TimelineEntry:
    return TimelineEntry.objects.create(
        incident=incident,
        kind=kind,
        text=text,
        actor=actor.user if actor else None,
        actor_name=actor.name if actor else actor_name,
        operation=operation,
        corrects=corrects,
        details=details or {},
    )


def open_incident(
    *,
    actor: Actor,
    title: str,
    scenario: str,
    severity: str,
    targets: list[Target] | None = None,
    culprit_migration: str = "",
    impact_started_at: dt.datetime | None = None,
    commander=None,
) -> Incident:
    """Open an incident, detected now, with its scenario's objectives copied as they stand."""
    require_permission(actor, OPEN_PERMISSION, "open incidents")
    title = (title or "").strip()
    if not title:
        raise InvalidRequest("an incident needs a title")
    if scenario not in Scenario.values:
        raise InvalidRequest(f"unknown scenario {scenario!r}")
    if severity not in Severity.values:
        raise InvalidRequest(f"unknown severity {severity!r}")
    now = timezone.now()
    if impact_started_at is not None and impact_started_at > now:
        raise InvalidRequest("impact cannot start in the future")
    commander = commander or actor.user
    objective = RecoveryObjective.objects.filter(scenario=scenario).first()
    with transaction.atomic():
        incident = Incident.objects.create(
            title=title,
            scenario=scenario,
            severity=severity,
            commander=commander,
            commander_name=commander.get_username() if commander else actor.name,
            culprit_migration=culprit_migration.strip(),
            opened_at=now,
            opened_by=actor.name,
            impact_started_at=impact_started_at,
            impact_started_by=actor.name if impact_started_at else "",
            detected_at=now,
            detected_by=actor.name,
            detected_auto=True,
            detect_objective=objective.detect_within if objective else None,
            mitigate_objective=objective.mitigate_within if objective else None,
            recover_objective=objective.recover_within if objective else None,
        )
        incident.affected_targets.set(targets or [])
        ChecklistItem.objects.bulk_create(
            ChecklistItem(incident=incident, key=key) for key in CHECKLIST_KEYS
        )
        add_entry(
            incident,
            EntryKind.OPENED,
            f"Opened: {incident.get_severity_display()} {incident.get_scenario_display()}, "
            f"commander {incident.commander_name}",
            actor=actor,
            details={
                "targets": sorted(t.name for t in targets or []),
                "objectives_seconds": {
                    phase: (value.total_seconds() if value else None)
                    for phase, value in [
                        ("detect", incident.detect_objective),
                        ("mitigate", incident.mitigate_objective),
                        ("recover", incident.recover_objective),
                    ]
                },
            },
        )
    return incident


# What people edit freely; status, timestamps and escalation have their own services.
EDITABLE_FIELDS = (
    "title",
    "severity",
    "culprit_migration",
    "summary",
    "impact",
    "trigger",
    "root_cause",
    "contributing_factors",
    "detection",
    "resolution",
    "went_well",
    "went_wrong",
    "got_lucky",
    "prevention",
    "process_improvements",
)


def update_incident(*, actor: Actor, incident: Incident, changed: list[str]) -> Incident:
    """Save edits of the free fields (``incident`` carries the new values), noted on the
    timeline by name."""
    require_permission(actor, CHANGE_PERMISSION, "change incidents")
    changed = [name for name in changed if name in EDITABLE_FIELDS]
    if not changed:
        return incident
    if not incident.title.strip():
        raise InvalidRequest("an incident needs a title")
    if incident.severity not in Severity.values:
        raise InvalidRequest(f"unknown severity {incident.severity!r}")
    with transaction.atomic():
        incident.save(update_fields=changed)
        labels = [str(Incident._meta.get_field(name).verbose_name) for name in changed]
        add_entry(
            incident,
            EntryKind.EDIT,
            f"Edited: {', '.join(labels)}",
            actor=actor,
            details={"fields": changed},
        )
    return incident


def _locked(incident: Incident) -> Incident:
    return Incident.objects.select_for_update().get(pk=incident.pk)


def change_status(*, actor: Actor, incident: Incident, status: str) -> Incident:
    """Move an incident forward in STATUS_ORDER (skipping ahead is allowed, going back is not).

    Monitoring means mitigated and resolved means recovered: the console fills in those
    timestamps by itself when no one has yet. The post-mortem and closing need what
    ``closing_gaps`` lists."""
    require_permission(actor, CHANGE_PERMISSION, "change incidents")
    if status not in STATUS_ORDER:
        raise InvalidRequest(f"unknown status {status!r}")
    with transaction.atomic():
        incident = _locked(incident)
        before = incident.status
        if STATUS_ORDER.index(status) <= STATUS_ORDER.index(before):
            raise InvalidRequest(
                f"incident #{incident.pk} is {IncidentStatus(before).label.lower()}: it can "
                f"only move forward ({' → '.join(STATUS_ORDER)})"
            )
        gaps = closing_gaps(incident, status)
        if gaps:
            raise InvalidRequest(
                f"incident #{incident.pk} cannot move to {IncidentStatus(status).label.lower()}: "
                f"{'; '.join(gaps)}"
            )
        incident.status = status
        incident.save(update_fields=["status"])
        add_entry(
            incident,
            EntryKind.STATUS,
            f"Status: {IncidentStatus(before).label} → {IncidentStatus(status).label}",
            actor=actor,
            details={"before": before, "after": status},
        )
        reached = STATUS_ORDER.index(status)
        if reached >= STATUS_ORDER.index(IncidentStatus.MONITORING):
            _set_automatically(actor, incident, "mitigated")
        if reached >= STATUS_ORDER.index(IncidentStatus.RESOLVED):
            _set_automatically(actor, incident, "recovered")
    return incident


def closing_gaps(incident: Incident, status: str) -> list[str]:
    """What the incident still lacks to move to ``status``: the post-mortem needs the recovered
    time (resolving sets it by itself; skipping past resolved does not); closing also needs
    every checklist item passed and a root cause.

    To come with action items: closing will also need at least one action item or a written
    reason why none is needed."""
    reached = STATUS_ORDER.index(status)
    gaps = []
    if reached < STATUS_ORDER.index(IncidentStatus.POST_MORTEM):
        return gaps
    if incident.recovered_at is None:
        gaps.append("the recovered time is not set")
    if reached < STATUS_ORDER.index(IncidentStatus.CLOSED):
        return gaps
    unpassed = [
        item.get_key_display()
        for item in incident.checklist.order_by("id")
        if item.result != CheckResult.PASSED
    ]
    if unpassed:
        gaps.append(f"checklist items not passed: {', '.join(unpassed)}")
    if not incident.root_cause.strip():
        gaps.append("no root cause")
    return gaps


def _set_automatically(actor: Actor, incident: Incident, name: str) -> None:
    if getattr(incident, f"{name}_at") is None:
        _set_timestamp(actor, incident, name, timezone.now(), automatic=True)


def check_chronology(incident: Incident, name: str, when: dt.datetime) -> None:
    """impact started ≤ detected ≤ mitigated ≤ recovered, among those that are set."""
    position = TIMESTAMPS.index(name)
    for other in TIMESTAMPS:
        other_at = getattr(incident, f"{other}_at")
        if other == name or other_at is None:
            continue
        earlier = TIMESTAMPS.index(other) < position
        if (earlier and when < other_at) or (not earlier and when > other_at):
            relation = "before" if earlier else "after"
            raise InvalidRequest(
                f"{TIMESTAMP_LABELS[name]} ({utc(when)}) cannot be {relation} "
                f"{TIMESTAMP_LABELS[other]} ({utc(other_at)})"
            )


def set_timestamp(*, actor: Actor, incident: Incident, name: str, when: dt.datetime) -> Incident:
    """Set (or correct) one of the incident's timestamps by hand."""
    require_permission(actor, CHANGE_PERMISSION, "change incidents")
    if name not in TIMESTAMPS:
        raise InvalidRequest(f"unknown timestamp {name!r}")
    if when is None or timezone.is_naive(when):
        raise InvalidRequest("a timestamp needs a date, a time and a time zone")
    if when > timezone.now():
        raise InvalidRequest(f"{TIMESTAMP_LABELS[name]} cannot be in the future")
    with transaction.atomic():
        incident = _locked(incident)
        _set_timestamp(actor, incident, name, when, automatic=False)
    return incident


def _set_timestamp(
    actor: Actor, incident: Incident, name: str, when: dt.datetime, *, automatic: bool
) -> None:
    check_chronology(incident, name, when)
    before = getattr(incident, f"{name}_at")
    setattr(incident, f"{name}_at", when)
    setattr(incident, f"{name}_by", actor.name)
    setattr(incident, f"{name}_auto", automatic)
    incident.save(update_fields=[f"{name}_at", f"{name}_by", f"{name}_auto"])
    how = " (automatically)" if automatic else ""
    was = f" (was {utc(before)})" if before else ""
    add_entry(
        incident,
        EntryKind.TIMESTAMP,
        f"{TIMESTAMP_LABELS[name].capitalize()} at {utc(when)}{was}{how}",
        actor=actor,
        details={
            "timestamp": name,
            "before": before.isoformat() if before else None,
            "after": when.isoformat(),
            "automatic": automatic,
        },
    )


def escalate(*, actor: Actor, incident: Incident, level: int, reason: str) -> Incident:
    """Change the escalation level (the runbook's path); up or down, always with a reason."""
    require_permission(actor, CHANGE_PERMISSION, "change incidents")
    reason = (reason or "").strip()
    if not reason:
        raise InvalidRequest("a reason is required to change the escalation level")
    if level not in EscalationLevel.values:
        raise InvalidRequest(f"escalation level must be 1 to 4, not {level!r}")
    with transaction.atomic():
        incident = _locked(incident)
        before = incident.escalation_level
        if level == before:
            raise InvalidRequest(f"incident #{incident.pk} is already at level {level}")
        incident.escalation_level = level
        incident.save(update_fields=["escalation_level"])
        verb = "Escalated" if level > before else "De-escalated"
        add_entry(
            incident,
            EntryKind.ESCALATION,
            f"{verb} to {EscalationLevel(level).label}: {reason}",
            actor=actor,
            details={"before": before, "after": level, "reason": reason},
        )
    return incident


def add_note(*, actor: Actor, incident: Incident, text: str) -> TimelineEntry:
    require_permission(actor, CHANGE_PERMISSION, "add notes to incidents")
    text = (text or "").strip()
    if not text:
        raise InvalidRequest("a note cannot be empty")
    return add_entry(incident, EntryKind.NOTE, text, actor=actor)


def correct_entry(*, actor: Actor, entry: TimelineEntry, text: str) -> TimelineEntry:
    """Entries are never edited: a correction is a new entry pointing at the one it corrects."""
    require_permission(actor, CHANGE_PERMISSION, "correct incident timelines")
    text = (text or "").strip()
    if not text:
        raise InvalidRequest("a correction cannot be empty")
    return add_entry(
        entry.incident,
        EntryKind.CORRECTION,
        f"Correction of entry #{entry.pk}: {text}",
        actor=actor,
        corrects=entry,
    )


# --- the timeline writes itself ------------------------------------------------------------
def _summary(value, limit: int = 300) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def record_operation(operation: Operation) -> list[TimelineEntry]:
    """Note an operation, when requested and when finished, on every open incident that has
    its target among the affected ones. Called by migrations_ops.services."""
    incidents = Incident.objects.filter(
        status__in=OPEN_STATUSES, affected_targets=operation.target_id
    ).distinct()
    what = f"operation #{operation.pk} ({operation.get_kind_display()}) on {operation.target.name}"
    dry_run = " (dry run)" if operation.params.get("dry_run") else ""
    if operation.is_finished:
        who = f"worker:{operation.worker or 'local'}"
        text = (
            f"{what.capitalize()}{dry_run} {operation.status}, requested by "
            f"{operation.requested_by_name}"
        )
        if operation.error:
            text += f": {operation.error}"
        result = operation.result or {}
        if "before" in result or "after" in result:
            text += (
                f"; before: {_summary(result.get('before'))}; after: "
                f"{_summary(result.get('after'))}"
            )
        details = {
            "status": operation.status,
            "error": operation.error,
            "before": result.get("before"),
            "after": result.get("after"),
        }
    else:
        who = operation.requested_by_name
        text = (
            f"{what.capitalize()}{dry_run} requested by {operation.requested_by_name} via "
            f"{operation.door} ({operation.get_status_display().lower()}): {operation.reason}"
        )
        details = {"status": operation.status, "reason": operation.reason}
    details["kind"] = operation.kind
    return [
        add_entry(
            incident,
            EntryKind.OPERATION,
            text,
            actor_name=who,
            operation=operation,
            details=details,
        )
        for incident in incidents
    ]


# --- the validation checklist --------------------------------------------------------------
def _refuse_closed(incident: Incident) -> None:
    if incident.status == IncidentStatus.CLOSED:
        raise InvalidRequest(f"incident #{incident.pk} is closed: its checklist is final")


def _record_check(
    actor: Actor, item: ChecklistItem, passed: bool, evidence: str, *, automatic: bool
) -> ChecklistItem:
    before = item.result
    item.result = CheckResult.PASSED if passed else CheckResult.FAILED
    item.evidence = evidence
    item.checked_by = actor.name
    item.checked_at = timezone.now()
    item.automatic = automatic
    item.save(update_fields=["result", "evidence", "checked_by", "checked_at", "automatic"])
    how = " (automatically)" if automatic else ""
    add_entry(
        item.incident,
        EntryKind.CHECKLIST,
        f"Checklist: {item.get_key_display()} {item.result}{how}: {evidence}",
        actor=actor,
        details={
            "item": item.key,
            "before": before,
            "after": item.result,
            "evidence": evidence,
            "automatic": automatic,
        },
    )
    return item


def tick_checklist_item(
    *, actor: Actor, item: ChecklistItem, passed: bool, evidence: str
) -> ChecklistItem:
    """A person marks one item passed or failed, always with the evidence they saw."""
    require_permission(actor, CHANGE_PERMISSION, "change incidents")
    evidence = (evidence or "").strip()
    if not evidence:
        raise InvalidRequest(f"evidence is required to tick {item.get_key_display()!r}")
    with transaction.atomic():
        incident = _locked(item.incident)
        _refuse_closed(incident)
        item = ChecklistItem.objects.select_for_update().get(pk=item.pk)
        item.incident = incident
        return _record_check(actor, item, passed, evidence, automatic=False)


def _check_target(target: Target) -> dict[str, tuple[bool, str]]:
    """One live read of the target (``read_target_status``): its lock, and its books compared
    with the imported scripts by the engine's ``verify_books``. Pending scripts are expected
    after a rollback and do not fail the books; anything else the comparison finds does."""
    status = ops.read_target_status(target)
    if status.error:
        unread = (False, f"{target.name}: could not be read: {status.error}")
        return {ChecklistKey.NO_STUCK_LOCKS: unread, ChecklistKey.TRACKING_CONSISTENT: unread}
    observation = status.observation
    if observation.held:
        since = f" since {utc(observation.since)}" if observation.since else ""
        lock = (False, f"{target.name}: lock held by {observation.holder or 'unknown'}{since}")
    else:
        lock = (True, f"{target.name}: lock free")
    scripts = ops.engine_scripts(target)
    if not scripts:
        books = (False, f"{target.name}: no scripts imported to compare the books with")
    else:
        drifted = {
            row.filename: ops.drift_description(row)
            for row in target.scripts.exclude(drift_checksum="")
        }
        problems = engine.plan.verify_books(status.applied, scripts, drifted=drifted)
        failing = [problem.message for problem in problems if problem.code != "pending"]
        pending = [problem.message for problem in problems if problem.code == "pending"]
        counts = f"{len(status.applied)} applied, {len(scripts)} scripts"
        if failing:
            books = (False, f"{target.name}: {'; '.join(failing)}")
        else:
            also = f" ({'; '.join(pending)})" if pending else ""
            books = (True, f"{target.name}: books consistent, {counts}{also}")
    return {ChecklistKey.NO_STUCK_LOCKS: lock, ChecklistKey.TRACKING_CONSISTENT: books}


def run_checks(*, actor: Actor, incident: Incident) -> list[ChecklistItem]:
    """Fill the items the console checks by itself (AUTOMATIC_CHECKS) from a live read of every
    affected target: an item passes only when it passes on all of them. The rest stay for a
    person."""
    require_permission(actor, CHANGE_PERMISSION, "change incidents")
    _refuse_closed(incident)
    targets = list(incident.affected_targets.order_by("name"))
    if not targets:
        raise InvalidRequest(
            f"incident #{incident.pk} has no affected targets: there is nothing to check live"
        )
    # Read outside the transaction: a slow target must not hold the incident's row.
    results = [_check_target(target) for target in targets]
    with transaction.atomic():
        incident = _locked(incident)
        _refuse_closed(incident)
        items = []
        for key in AUTOMATIC_CHECKS:
            item = ChecklistItem.objects.select_for_update().get(incident=incident, key=key)
            item.incident = incident
            passed = all(result[key][0] for result in results)
            evidence = "; ".join(result[key][1] for result in results)
            items.append(_record_check(actor, item, passed, evidence, automatic=True))
    return items
