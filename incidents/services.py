"""Every write to incidents and their timelines. Errors meant for the user are
``migrations_ops.services.ServiceError`` with a one-line message, as everywhere else."""

from __future__ import annotations

import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from incidents import selectors
from incidents.models import (
    AUTOMATIC_CHECKS,
    CHANGE_PERMISSION,
    CHECKLIST_KEYS,
    HEALTH_CHECK,
    OPEN_PERMISSION,
    STATUS_ORDER,
    TIMESTAMPS,
    ActionItem,
    ActionItemKind,
    ActionItemStatus,
    ChecklistItem,
    ChecklistKey,
    CheckResult,
    Drill,
    DrillKind,
    DrillRun,
    DrillRunStatus,
    EntryKind,
    EscalationContact,
    EscalationLevel,
    Incident,
    IncidentStatus,
    PostmortemAddendum,
    RecoveryObjective,
    Scenario,
    Severity,
    TimelineEntry,
)
from migrations_ops import engine
from migrations_ops import selectors as ops_selectors
from migrations_ops import services as ops
from migrations_ops.actors import Actor
from migrations_ops.engine import health
from migrations_ops.models import Environment, FlagChange, FlagChangeKind, Operation, Target
from migrations_ops.services import InvalidRequest, ServiceError, require_permission

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


def record_change(
    actor: Actor,
    incident: Incident,
    kind: str,
    text: str,
    *,
    action: str,
    details: dict | None = None,
    subject=None,
    before: dict | None = None,
    after: dict | None = None,
) -> TimelineEntry:
    """A person's change, noted twice in the same words: on the incident's timeline (as it
    always was) and on the audit trail, with the changed fields before → after for the History
    page of ``subject`` (the incident, unless an action item or checklist item). The audit
    event comes last: the audit chain's lock is the last one a transaction takes."""
    entry = add_entry(incident, kind, text, actor=actor, details=details)
    ops.record_audit_event(
        actor,
        action,
        details={"incident": incident.pk, "text": text},
        subject=subject if subject is not None else incident,
        before=before,
        after=after,
    )
    return entry


def _iso(moment: dt.datetime | dt.date | None) -> str | None:
    return moment.isoformat() if moment else None


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
    is_drill: bool = False,
) -> Incident:
    """Open an incident, detected now, with its scenario's objectives copied as they stand.
    ``is_drill``: a drill's (``run_drill``), kept out of the real incident figures."""
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
    if commander is not None:
        _require_commander(commander)
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
            is_drill=is_drill,
        )
        incident.affected_targets.set(targets or [])
        ChecklistItem.objects.bulk_create(
            ChecklistItem(incident=incident, key=key) for key in CHECKLIST_KEYS
        )
        record_change(
            actor,
            incident,
            EntryKind.OPENED,
            f"Opened: {incident.get_severity_display()} {incident.get_scenario_display()}, "
            f"commander {incident.commander_name}",
            action="incident.opened",
            after={
                "title": incident.title,
                "scenario": incident.scenario,
                "severity": incident.severity,
                "commander": incident.commander_name,
                "affected_targets": sorted(t.name for t in targets or []),
            },
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


def _require_commander(user) -> None:
    """A commander runs the incident, so they must be able to change it."""
    if not (user.is_active and user.has_perm(CHANGE_PERMISSION)):
        raise InvalidRequest(
            f"{user.get_username()} cannot command incidents: they may not change them"
        )


# What people edit freely; status, timestamps and escalation have their own services. All of
# it is the post-mortem's text, frozen once the incident closes (addenda then).
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
    "no_action_items_reason",
)


def _refuse_frozen(incident: Incident) -> None:
    if incident.status == IncidentStatus.CLOSED:
        raise InvalidRequest(
            f"incident #{incident.pk} is closed: its post-mortem is frozen, add an addendum instead"
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
        # The stored status, not the instance's: the form's copy may be stale.
        stored = _locked(incident)
        _refuse_frozen(stored)
        incident.save(update_fields=changed)
        labels = [str(Incident._meta.get_field(name).verbose_name) for name in changed]
        differ = [name for name in changed if getattr(stored, name) != getattr(incident, name)]
        record_change(
            actor,
            incident,
            EntryKind.EDIT,
            f"Edited: {', '.join(labels)}",
            action="incident.changed",
            details={"fields": changed},
            before={name: getattr(stored, name) for name in differ},
            after={name: getattr(incident, name) for name in differ},
        )
    return incident


def _locked(incident: Incident) -> Incident:
    # FOR NO KEY UPDATE: it serialises the incident's services, yet lets a timeline entry be
    # written meanwhile by a transaction that already holds the audit chain's lock
    # (migrations_ops.audit_chain), which a plain FOR UPDATE would deadlock with.
    return Incident.objects.select_for_update(no_key=True).get(pk=incident.pk)


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
        if status == IncidentStatus.CLOSED:
            incident.closed_at = timezone.now()
        incident.save(update_fields=["status", "closed_at"])
        record_change(
            actor,
            incident,
            EntryKind.STATUS,
            f"Status: {IncidentStatus(before).label} → {IncidentStatus(status).label}",
            action="incident.status_changed",
            details={"before": before, "after": status},
            before={"status": before},
            after={"status": status},
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
    every checklist item passed, a root cause, and at least one action item or a written
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
    if not incident.no_action_items_reason.strip() and not incident.action_items.exists():
        gaps.append("no action items and no reason why none are needed")
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
        _refuse_frozen(incident)
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
    record_change(
        actor,
        incident,
        EntryKind.TIMESTAMP,
        f"{TIMESTAMP_LABELS[name].capitalize()} at {utc(when)}{was}{how}",
        action="incident.timestamp_set",
        before={f"{name}_at": _iso(before)},
        after={f"{name}_at": _iso(when)},
        details={
            "timestamp": name,
            "before": before.isoformat() if before else None,
            "after": when.isoformat(),
            "automatic": automatic,
        },
    )


def contact_channels(contact: EscalationContact) -> str:
    """The contact's channels on one line."""
    channels = [line.strip() for line in contact.reaches.splitlines() if line.strip()]
    return ", ".join(channels) or "no channel recorded"


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
        _refuse_frozen(incident)
        before = incident.escalation_level
        if level == before:
            raise InvalidRequest(f"incident #{incident.pk} is already at level {level}")
        incident.escalation_level = level
        incident.save(update_fields=["escalation_level"])
        verb = "Escalated" if level > before else "De-escalated"
        # Copied as it stands: editing the contact later must not change who was reached.
        contact = EscalationContact.objects.filter(level=level).first()
        if contact:
            reached = f"; reaches {contact.team} ({contact_channels(contact)})"
        else:
            reached = "; no contact recorded for this level"
        record_change(
            actor,
            incident,
            EntryKind.ESCALATION,
            f"{verb} to {EscalationLevel(level).label}: {reason}{reached}",
            action="incident.escalated",
            before={"escalation_level": before},
            after={"escalation_level": level},
            details={
                "before": before,
                "after": level,
                "reason": reason,
                "team": contact.team if contact else None,
                "reaches": contact.reaches if contact else None,
            },
        )
    return incident


def add_note(*, actor: Actor, incident: Incident, text: str) -> TimelineEntry:
    require_permission(actor, CHANGE_PERMISSION, "add notes to incidents")
    text = (text or "").strip()
    if not text:
        raise InvalidRequest("a note cannot be empty")
    return record_change(actor, incident, EntryKind.NOTE, text, action="incident.note_added")


def correct_entry(*, actor: Actor, entry: TimelineEntry, text: str) -> TimelineEntry:
    """Entries are never edited: a correction is a new entry pointing at the one it corrects."""
    require_permission(actor, CHANGE_PERMISSION, "correct incident timelines")
    text = (text or "").strip()
    if not text:
        raise InvalidRequest("a correction cannot be empty")
    corrected = add_entry(
        entry.incident,
        EntryKind.CORRECTION,
        f"Correction of entry #{entry.pk}: {text}",
        actor=actor,
        corrects=entry,
    )
    ops.record_audit_event(
        actor,
        "incident.entry_corrected",
        details={"incident": entry.incident_id, "entry": entry.pk, "text": corrected.text},
        subject=entry.incident,
    )
    return corrected


def change_commander(*, actor: Actor, incident: Incident, commander) -> Incident:
    """Hand the incident to another commander (who need not be the person who opened it)."""
    require_permission(actor, CHANGE_PERMISSION, "change incidents")
    if commander is None:
        raise InvalidRequest("choose the new commander")
    _require_commander(commander)
    with transaction.atomic():
        incident = _locked(incident)
        _refuse_frozen(incident)
        if incident.commander_id == commander.pk:
            raise InvalidRequest(
                f"{commander.get_username()} already commands incident #{incident.pk}"
            )
        before = incident.commander_name
        incident.commander = commander
        incident.commander_name = commander.get_username()
        incident.save(update_fields=["commander", "commander_name"])
        record_change(
            actor,
            incident,
            EntryKind.EDIT,
            f"Commander: {before or 'nobody'} → {incident.commander_name}",
            action="incident.commander_changed",
            details={"fields": ["commander"], "before": before, "after": incident.commander_name},
            before={"commander": before},
            after={"commander": incident.commander_name},
        )
    return incident


# --- follow-ups ----------------------------------------------------------------------------
class _Unchanged:
    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()


def _clean_link(link: str) -> str:
    link = (link or "").strip()
    if link:
        try:
            URLValidator(schemes=["http", "https"])(link)
        except ValidationError:
            raise InvalidRequest(f"the link must be an http(s) address, not {link!r}") from None
    return link


def _require_owner(owner) -> None:
    if owner is None:
        raise InvalidRequest("an action item needs an owner")
    if not owner.is_active:
        raise InvalidRequest(f"{owner.get_username()} is not an active user")


def add_action_item(
    *,
    actor: Actor,
    incident: Incident,
    title: str,
    kind: str,
    owner,
    due_date: dt.date | None = None,
    link: str = "",
) -> ActionItem:
    """A follow-up with an owner; allowed after closing too, since follow-ups go on."""
    require_permission(actor, CHANGE_PERMISSION, "change incidents")
    title = (title or "").strip()
    if not title:
        raise InvalidRequest("an action item needs a title")
    if kind not in ActionItemKind.values:
        raise InvalidRequest(
            f"unknown action item kind {kind!r} (one of {', '.join(ActionItemKind.values)})"
        )
    _require_owner(owner)
    link = _clean_link(link)
    with transaction.atomic():
        incident = _locked(incident)
        item = ActionItem.objects.create(
            incident=incident,
            title=title,
            kind=kind,
            owner=owner,
            owner_name=owner.get_username(),
            due_date=due_date,
            link=link,
            created_by=actor.name,
        )
        due = f", due {due_date.isoformat()}" if due_date else ""
        record_change(
            actor,
            incident,
            EntryKind.ACTION_ITEM,
            f"Action item #{item.pk} added ({item.get_kind_display().lower()}): {title}; "
            f"owner {item.owner_name}{due}",
            action="action_item.added",
            subject=item,
            after={
                "title": title,
                "kind": kind,
                "status": item.status,
                "owner": item.owner_name,
                "due_date": _iso(due_date),
                "link": link,
            },
            details={
                "action_item": item.pk,
                "title": title,
                "kind": kind,
                "owner": item.owner_name,
                "due_date": due_date.isoformat() if due_date else None,
                "link": link,
            },
        )
    return item


def _shown(value) -> str:
    if value is None or value == "":
        return "none"
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def update_action_item(
    *,
    actor: Actor,
    item: ActionItem,
    status=UNCHANGED,
    due_date=UNCHANGED,
    owner=UNCHANGED,
    link=UNCHANGED,
) -> ActionItem:
    """Move a follow-up on: its status, due date, owner or link; each change is noted on the
    timeline with what it was. Allowed after closing: that is not the post-mortem's text."""
    require_permission(actor, CHANGE_PERMISSION, "change incidents")
    if status is not UNCHANGED and status not in ActionItemStatus.values:
        raise InvalidRequest(f"unknown action item status {status!r}")
    if owner is not UNCHANGED:
        _require_owner(owner)
    if link is not UNCHANGED:
        link = _clean_link(link)
    with transaction.atomic():
        _locked(item.incident)
        item = ActionItem.objects.select_for_update().select_related("incident").get(pk=item.pk)
        changes = {}  # label → (before, after) as the timeline shows them
        fields = []
        was, now = {}, {}  # field → value, for the audit trail
        for label, name, value in [("status", "status", status), ("due", "due_date", due_date)]:
            if value is not UNCHANGED and value != getattr(item, name):
                before = getattr(item, name)
                dated = name == "due_date"
                was[name] = _iso(before) if dated else before
                now[name] = _iso(value) if dated else value
                if name == "status":  # as people read it: "In progress", not "in_progress"
                    changes[label] = (ActionItemStatus(before).label, ActionItemStatus(value).label)
                else:
                    changes[label] = (_shown(before), _shown(value))
                setattr(item, name, value)
                fields.append(name)
        if owner is not UNCHANGED and owner.pk != item.owner_id:
            changes["owner"] = (item.owner_name, owner.get_username())
            was["owner"], now["owner"] = changes["owner"]
            item.owner, item.owner_name = owner, owner.get_username()
            fields += ["owner", "owner_name"]
        if link is not UNCHANGED and link != item.link:
            changes["link"] = (_shown(item.link), _shown(link))
            was["link"], now["link"] = item.link, link
            item.link = link
            fields.append("link")
        if not changes:
            raise InvalidRequest(f"action item #{item.pk}: nothing to change")
        item.save(update_fields=fields)
        described = "; ".join(f"{label} {was} → {now}" for label, (was, now) in changes.items())
        record_change(
            actor,
            item.incident,
            EntryKind.ACTION_ITEM,
            f"Action item #{item.pk} ({item.title}): {described}",
            action="action_item.changed",
            details={"action_item": item.pk, "changes": changes},
            subject=item,
            before=was,
            after=now,
        )
    return item


def add_addendum(*, actor: Actor, incident: Incident, text: str) -> PostmortemAddendum:
    """What was learned after closing, appended to the frozen post-mortem. Before closing,
    people edit the post-mortem itself."""
    require_permission(actor, CHANGE_PERMISSION, "change incidents")
    text = (text or "").strip()
    if not text:
        raise InvalidRequest("an addendum cannot be empty")
    with transaction.atomic():
        incident = _locked(incident)
        if incident.status != IncidentStatus.CLOSED:
            raise InvalidRequest(
                f"incident #{incident.pk} is not closed: edit its post-mortem instead of "
                "adding an addendum"
            )
        addendum = PostmortemAddendum.objects.create(
            incident=incident, added_by=actor.name, text=text
        )
        record_change(
            actor,
            incident,
            EntryKind.ADDENDUM,
            f"Post-mortem addendum #{addendum.pk}: {text}",
            action="incident.addendum_added",
            details={"addendum": addendum.pk},
        )
    return addendum


# --- the timeline writes itself ------------------------------------------------------------
class IncidentNotFound(ServiceError):
    pass


def get_incident(incident_id: int) -> Incident:
    """The incident an operation is asked for (``--incident N``, ``"incident": N``)."""
    try:
        return Incident.objects.get(pk=incident_id)
    except Incident.DoesNotExist:
        raise IncidentNotFound(f"no incident #{incident_id}") from None


def _summary(value, limit: int = 300) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def record_operation(
    operation: Operation, incidents: list[Incident] | None = None
) -> list[TimelineEntry]:
    """Note an operation, when requested and when finished, on the incidents it concerns
    (``selectors.incidents_to_note``, unless the caller has read them already). Called by
    migrations_ops.services."""
    if incidents is None:
        incidents = selectors.incidents_to_note(operation)
    what = f"operation #{operation.pk} ({operation.get_kind_display()}) on {operation.target.name}"
    if operation.incident_id:
        what += f" for incident #{operation.incident_id}"
    dry_run = " (dry run)" if operation.params.get("dry_run") else ""
    if operation.is_finished:
        who = f"worker:{operation.worker or 'local'}"
        text = (
            f"{what[:1].upper()}{what[1:]}{dry_run} {operation.status}, requested by "
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
            f"{what[:1].upper()}{what[1:]}{dry_run} requested by {operation.requested_by_name} via "
            f"{operation.door} ({operation.get_status_display().lower()}): {operation.reason}"
        )
        details = {"status": operation.status, "reason": operation.reason}
    details["kind"] = operation.kind
    details["incident"] = operation.incident_id
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


def record_flag_change(flag_change: FlagChange) -> list[TimelineEntry]:
    """Note a change of a target's runtime flags on every open incident affecting the target.
    Called by migrations_ops.services."""
    target = flag_change.target
    what = ops_selectors.describe_flag_change(flag_change)
    kind = "" if flag_change.kind == FlagChangeKind.SET else f"{flag_change.get_kind_display()}: "
    text = (
        f"{kind}flags of {target.name}: {what} ({flag_change.reason}), by "
        f"{flag_change.actor_name} via {flag_change.door}"
    )
    details = {
        "flag_change": flag_change.pk,
        "kind": flag_change.kind,
        "before": flag_change.before,
        "after": flag_change.after,
        "stage_before": flag_change.stage_before,
        "stage_after": flag_change.stage_after,
    }
    return [
        add_entry(
            incident, EntryKind.FLAG, text, actor_name=flag_change.actor_name, details=details
        )
        for incident in selectors.open_incidents_affecting(target)
    ]


# --- the validation checklist --------------------------------------------------------------
def _refuse_closed(incident: Incident) -> None:
    if incident.status == IncidentStatus.CLOSED:
        raise InvalidRequest(f"incident #{incident.pk} is closed: its checklist is final")


def _record_check(
    actor: Actor, item: ChecklistItem, passed: bool | None, evidence: str, *, automatic: bool
) -> ChecklistItem:
    """``passed`` None: checked in part, the rest for a person (the item stays pending)."""
    before = item.result
    if passed is None:
        item.result = CheckResult.PENDING
    else:
        item.result = CheckResult.PASSED if passed else CheckResult.FAILED
    item.evidence = evidence
    item.checked_by = actor.name
    item.checked_at = timezone.now()
    item.automatic = automatic
    item.save(update_fields=["result", "evidence", "checked_by", "checked_at", "automatic"])
    how = " (automatically)" if automatic else ""
    record_change(
        actor,
        item.incident,
        EntryKind.CHECKLIST,
        f"Checklist: {item.get_key_display()} {item.result}{how}: {evidence}",
        action="checklist.checked",
        subject=item,
        before={"result": before},
        after={"result": item.result, "evidence": evidence},
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


def _check_health(targets: list[Target]) -> dict[int, tuple[bool | None, str]]:
    """Ask each target's health URL, all at once (HEALTH_CHECK_TIMEOUT bounds each check, and
    so all of them), within HEALTH_CHECK_ALLOWED_NETWORKS; None: it has none to ask."""
    asked = [target for target in targets if target.health_url]
    answers = health.probe_all(
        [target.health_url for target in asked],
        settings.HEALTH_CHECK_TIMEOUT,
        allowed_networks=settings.HEALTH_CHECK_ALLOWED_NETWORKS,
    )
    found = {
        target.pk: (answer.ok, f"{target.name}: {answer.describe()}")
        for target, answer in zip(asked, answers, strict=True)
    }
    unasked = {
        target.pk: (None, f"{target.name}: no health URL, for a person to check")
        for target in targets
    }
    return unasked | found


def _check_target(target: Target) -> dict[str, tuple[bool | None, str]]:
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
    scripts = ops.script_summaries(target)
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
    """Fill the items the console checks by itself (AUTOMATIC_CHECKS, and HEALTH_CHECK when an
    affected target has a health URL) from a live read of every affected target: an item
    passes only when it passes on all of them, fails when it fails on one, and stays pending
    when targets without a health URL are left for a person. The rest stay for a person."""
    require_permission(actor, CHANGE_PERMISSION, "change incidents")
    _refuse_closed(incident)
    targets = list(incident.affected_targets.order_by("name"))
    if not targets:
        raise InvalidRequest(
            f"incident #{incident.pk} has no affected targets: there is nothing to check live"
        )
    # Read outside the transaction: a slow target must not hold the incident's row. The health
    # URLs are asked meanwhile, aside (no database there), so they add no time of their own.
    keys = list(AUTOMATIC_CHECKS)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-checks") as aside:
        healths = aside.submit(_check_health, targets)
        results = [_check_target(target) for target in targets]
        if any(target.health_url for target in targets):
            keys.append(HEALTH_CHECK)
            for target, result in zip(targets, results, strict=True):
                result[HEALTH_CHECK] = healths.result()[target.pk]
    with transaction.atomic():
        incident = _locked(incident)
        _refuse_closed(incident)
        items = []
        for key in keys:
            item = ChecklistItem.objects.select_for_update().get(incident=incident, key=key)
            item.incident = incident
            verdicts = [result[key][0] for result in results]
            passed = False if False in verdicts else None if None in verdicts else True
            evidence = "; ".join(result[key][1] for result in results)
            items.append(_record_check(actor, item, passed, evidence, automatic=True))
    return items


# --- drills ----------------------------------------------------------------------------------
# The runbook's regular rehearsals on sandbox targets. The fault-making and the procedure are in
# ``incidents.drills``; here, who may, where, and when.
DRILL_PERMISSION = "incidents.run_drill"
DRILL_TASK = "incidents.tasks.run_scheduled_drill"
# A run still "running" after this is taken as lost (its process died): it no longer blocks.
DRILL_RUN_LOST_AFTER = dt.timedelta(hours=2)
# Celery beat's crontab per drill, in UTC: monthly on the 1st, quarterly on the 1st of
# January, April, July and October, at 03:00.
DRILL_CRONTABS = {
    DrillKind.LOCK_RELEASE: {"minute": "0", "hour": "3", "day_of_month": "1", "month_of_year": "*"},
    DrillKind.ROLLBACK: {
        "minute": "0",
        "hour": "3",
        "day_of_month": "1",
        "month_of_year": "1,4,7,10",
    },
}


def _refuse_unless_sandbox(target: Target, what: str) -> None:
    if target.environment != Environment.SANDBOX:
        raise InvalidRequest(
            f"{target.name} is a {target.get_environment_display().lower()} target: "
            f"{what} only on a sandbox target"
        )


def schedule_drill(*, actor: Actor, kind: str, target: Target, enabled: bool = True) -> Drill:
    """Create or change the drill of ``kind`` on ``target`` and its django-celery-beat
    periodic task (DRILL_CRONTABS); a disabled drill's task is disabled with it."""
    require_permission(actor, "incidents.add_drill", "schedule drills")
    if kind not in DrillKind.values:
        raise InvalidRequest(f"unknown drill {kind!r} (known: {', '.join(DrillKind.values)})")
    _refuse_unless_sandbox(target, "drills are scheduled")
    with transaction.atomic():
        drill, created = Drill.objects.select_for_update().get_or_create(
            kind=kind, target=target, defaults={"enabled": enabled}
        )
        crontab, _ = CrontabSchedule.objects.get_or_create(
            **DRILL_CRONTABS[kind], day_of_week="*", timezone="UTC"
        )
        task = drill.periodic_task or PeriodicTask(name=f"drill #{drill.pk}: {drill}")
        task.crontab = crontab
        task.interval = None
        task.task = DRILL_TASK
        task.args = json.dumps([drill.pk])
        task.enabled = enabled
        task.description = f"The runbook's {drill.get_kind_display().lower()} on {target.name}"
        task.save()
        drill.enabled = enabled
        drill.periodic_task = task
        drill.save(update_fields=["enabled", "periodic_task"])
        ops.record_audit_event(
            actor,
            "drill.scheduled" if created else "drill.changed",
            target=target,
            details={"drill": drill.pk, "kind": kind, "enabled": enabled},
        )
    return drill


def start_drill(*, actor: Actor, drill: Drill, scheduled: bool = False) -> DrillRun:
    """Write the run (status running) once nothing refuses it: a target not sandbox, or a run
    of a drill on that target still running. ``perform_drill_run`` then does the work."""
    require_permission(actor, DRILL_PERMISSION, "run drills")
    target = drill.target
    _refuse_unless_sandbox(target, "drills run")
    with transaction.atomic():
        Target.objects.select_for_update().get(pk=target.pk)  # one starter at a time
        # A run whose process died (worker killed, host rebooted) would block every later one.
        lost_before = timezone.now() - DRILL_RUN_LOST_AFTER
        DrillRun.objects.filter(
            drill__target=target, status=DrillRunStatus.RUNNING, started_at__lt=lost_before
        ).update(
            status=DrillRunStatus.FAILED,
            finished_at=timezone.now(),
            error=f"lost: not finished within {DRILL_RUN_LOST_AFTER}",
        )
        running = (
            DrillRun.objects.filter(drill__target=target, status=DrillRunStatus.RUNNING)
            .select_related("drill")
            .first()
        )
        if running is not None:
            raise InvalidRequest(
                f"drill run #{running.pk} ({running.drill.get_kind_display().lower()}) is still "
                f"running on {target.name}: wait for it to finish"
            )
        run = DrillRun.objects.create(drill=drill, started_by=actor.name, scheduled=scheduled)
        ops.record_audit_event(
            actor,
            "drill.started",
            target=target,
            details={"drill": drill.pk, "kind": drill.kind, "run": run.pk, "scheduled": scheduled},
        )
    return run


def perform_drill_run(run_id: int) -> DrillRun:
    """Make the fault, follow the procedure, record and score it (``incidents.drills``)."""
    from incidents import drills  # it builds on this module's services

    run = DrillRun.objects.select_related("drill__target").get(pk=run_id)
    if run.status != DrillRunStatus.RUNNING or run.log:
        return run  # done, or under way elsewhere (a task delivered twice)
    return drills.perform(run)


def run_drill(*, actor: Actor, drill: Drill, scheduled: bool = False) -> DrillRun:
    """Run the drill here and now, to the end (CLI, schedule)."""
    run = start_drill(actor=actor, drill=drill, scheduled=scheduled)
    return perform_drill_run(run.pk)


def request_drill(*, actor: Actor, drill: Drill) -> DrillRun:
    """Start the drill on a worker (admin): the run is written first, like an operation, and
    the task sent once it is committed."""
    from incidents.tasks import run_drill_task

    run = start_drill(actor=actor, drill=drill)
    transaction.on_commit(lambda: run_drill_task.delay(run.pk))
    return run
