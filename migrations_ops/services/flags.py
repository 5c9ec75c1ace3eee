"""Runtime flags: changing them, the emergency disable and its re-enable steps."""

from __future__ import annotations

import logging

from django.core.exceptions import ValidationError
from django.db import transaction

from migrations_ops import selectors
from migrations_ops.actors import Actor
from migrations_ops.models import FLAG_FIELDS, FlagChange, FlagChangeKind, FlagStage, Target
from migrations_ops.services.audit import record_audit_event
from migrations_ops.services.errors import (
    InvalidRequest,
    TargetNotFound,
    _require_reason,
    require_permission,
)

logger = logging.getLogger(__name__)


CHANGE_FLAGS_PERMISSION = "migrations_ops.change_flags"
_TRUE_WORDS = {"true", "on", "yes", "1"}
_FALSE_WORDS = {"false", "off", "no", "0"}


def parse_flag_value(name: str, value):
    """A flag's value from a door: a bool or int as is, or text such as ``false`` or ``3``.
    Bounds are checked later, by the model fields' own validators."""
    field = Target._meta.get_field(FLAG_FIELDS[name])
    if field.get_internal_type() == "BooleanField":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in _TRUE_WORDS | _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise InvalidRequest(f"{name} must be true or false, not {value!r}")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise InvalidRequest(f"{name} must be a whole number, not {value!r}") from None


def _clean_flag_changes(changes: dict) -> dict:
    """Runbook name → validated value, or InvalidRequest naming the first bad one."""
    if not changes:
        raise InvalidRequest("nothing to change: no flag given")
    unknown = sorted(set(changes) - set(FLAG_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown flag {', '.join(unknown)} (known: {', '.join(FLAG_FIELDS)})")
    cleaned = {}
    for name, raw in changes.items():
        value = parse_flag_value(name, raw)
        try:
            Target._meta.get_field(FLAG_FIELDS[name]).run_validators(value)
        except ValidationError as error:
            raise InvalidRequest(f"{name}={value}: {' '.join(error.messages)}") from None
        cleaned[name] = value
    return cleaned


def _locked_targets(targets) -> list[Target]:
    """The targets' rows, locked in id order (two disables of overlapping sets never deadlock)."""
    ids = sorted({target.pk for target in targets})
    return list(Target.objects.select_for_update().filter(pk__in=ids).order_by("pk"))


def _write_flag_change(
    actor: Actor, target: Target, values: dict, *, reason: str, kind: str, stage_after: str
) -> FlagChange:
    """Set ``values`` on the locked ``target`` and record it: the FlagChange (only the flags
    whose value changed), the audit event and the open incidents' timelines."""
    before, after = {}, {}
    for name, value in values.items():
        attribute = FLAG_FIELDS[name]
        if getattr(target, attribute) != value:
            before[name], after[name] = getattr(target, attribute), value
            setattr(target, attribute, value)
    stage_before = target.flag_stage
    target.flag_stage = stage_after
    target.save(update_fields=[FLAG_FIELDS[name] for name in after] + ["flag_stage", "updated_at"])
    change = FlagChange.objects.create(
        target=target,
        actor=actor.user,
        actor_name=actor.name,
        door=actor.door,
        kind=kind,
        reason=reason,
        before=before,
        after=after,
        stage_before=stage_before,
        stage_after=stage_after,
    )
    record_audit_event(
        actor,
        "flags.changed",
        target=target,
        details={
            "kind": kind,
            "before": before,
            "after": after,
            "stage_before": stage_before,
            "stage_after": stage_after,
            "reason": reason,
            "flag_change": change.pk,
        },
        subject=target,  # on the target's History page
        before=before,
        after=after,
    )
    _note_flag_change_on_incidents(change)
    return change


def _note_flag_change_on_incidents(change: FlagChange) -> None:
    """As ``_note_on_incidents``: a failure to write a timeline is logged, and never undoes the
    flag change (the savepoint keeps the rest of the transaction)."""
    try:
        from incidents.services import record_flag_change  # incidents builds on this module

        with transaction.atomic():
            record_flag_change(change)
    except Exception:
        logger.exception("could not note flag change #%s on incident timelines", change.pk)


def change_flags(
    *, actor: Actor, target: Target, changes: dict, reason: str, kind: str = FlagChangeKind.SET
) -> FlagChange:
    """Set some of a target's runtime flags by their runbook names (``{"AUTO_MIGRATE": False}``).

    Validated against the model fields' bounds; a change that changes nothing is refused. A
    change by hand keeps the target's re-enable stage: setting AUTO_MIGRATE=false and retries 0
    by hand is not an emergency disable (use ``emergency_disable``, which starts the guided
    re-enable), and changing a flag in the middle of a re-enable leaves the next step due (that
    step sets its flags again). ``kind`` is ``set`` or ``drill``; the other kinds belong to
    ``emergency_disable`` and ``reenable_step``.
    """
    require_permission(actor, CHANGE_FLAGS_PERMISSION, "change runtime flags")
    if kind not in (FlagChangeKind.SET, FlagChangeKind.DRILL):
        raise InvalidRequest(f"a flag change by hand cannot be of kind {kind!r}")
    values = _clean_flag_changes(changes)
    reason = _require_reason(reason, "change runtime flags")
    with transaction.atomic():
        (locked,) = _locked_targets([target]) or [None]
        if locked is None:
            raise TargetNotFound(f"target {target.name!r} no longer exists")
        if all(getattr(locked, FLAG_FIELDS[name]) == value for name, value in values.items()):
            raise InvalidRequest(
                f"nothing to change: {target.name} already has {selectors.describe_flags(values)}"
            )
        change = _write_flag_change(
            actor, locked, values, reason=reason, kind=kind, stage_after=locked.flag_stage
        )
    _refresh_flags(target, locked)
    return change


def emergency_disable(*, actor: Actor, targets, reason: str) -> list[FlagChange]:
    """The runbook's "Quick Disable" (AUTO_MIGRATE=false, MIGRATION_DRY_RUN=true,
    MIGRATION_MAX_RETRIES=0) on every target in ``targets``: all or none. Each target gets
    one FlagChange and the stage ``disabled`` (from which the guided re-enable starts), even
    one disabled already: the reason is worth keeping."""
    require_permission(actor, CHANGE_FLAGS_PERMISSION, "disable auto-migration")
    reason = _require_reason(reason, "disable auto-migration")
    targets = list(targets)
    if not targets:
        raise InvalidRequest("no target to disable")
    with transaction.atomic():
        locked = _locked_targets(targets)
        missing = {t.name for t in targets} - {t.name for t in locked}
        if missing:
            raise TargetNotFound(f"unknown target {', '.join(sorted(missing))}")
        changes = [
            _write_flag_change(
                actor,
                target,
                selectors.QUICK_DISABLE,
                reason=reason,
                kind=FlagChangeKind.EMERGENCY_DISABLE,
                stage_after=FlagStage.DISABLED,
            )
            for target in locked
        ]
    by_id = {target.pk: target for target in locked}
    for target in targets:
        _refresh_flags(target, by_id[target.pk])
    return changes


def reenable_step(*, actor: Actor, target: Target, step: int, reason: str) -> FlagChange:
    """One step of the runbook's "Progressive Re-enable", only in order: 1 from an emergency
    disable, 2 after 1, 3 after 2 (which ends in the normal stage)."""
    require_permission(actor, CHANGE_FLAGS_PERMISSION, "re-enable auto-migration")
    if step not in selectors.REENABLE_STEPS:
        raise InvalidRequest(f"no re-enable step {step}: the steps are 1, 2 and 3")
    reason = _require_reason(reason, "take a re-enable step")
    definition = selectors.REENABLE_STEPS[step]
    with transaction.atomic():
        (locked,) = _locked_targets([target]) or [None]
        if locked is None:
            raise TargetNotFound(f"target {target.name!r} no longer exists")
        due = selectors.next_reenable_step(locked)
        if due is None:
            raise InvalidRequest(
                f"{target.name} is not emergency-disabled: there is no re-enable step to take"
            )
        if due != step:
            raise InvalidRequest(f"step {step} is not due on {target.name}: step {due} is next")
        change = _write_flag_change(
            actor,
            locked,
            definition.sets,
            reason=reason,
            kind=definition.kind,
            stage_after=definition.stage_after,
        )
    _refresh_flags(target, locked)
    return change


def _refresh_flags(target: Target, saved: Target) -> None:
    """The caller's instance shows what was saved (as a door prints it right after)."""
    for name in [*FLAG_FIELDS.values(), "flag_stage", "updated_at"]:
        setattr(target, name, getattr(saved, name))
