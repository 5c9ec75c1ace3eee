"""Registering and saving targets: settings, secrets (and their rotation), alert thresholds."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction

from migrations_ops import selectors
from migrations_ops.actors import Actor
from migrations_ops.fields import SecretKeyError
from migrations_ops.models import TARGET_SETTINGS, AlertThresholds, Environment, Target
from migrations_ops.services.audit import record_audit_event
from migrations_ops.services.errors import (
    ServiceError,
    TargetNotFound,
    _validation_message,
    require_permission,
)


def get_target(name: str) -> Target:
    try:
        return Target.objects.get(name=name)
    except Target.DoesNotExist:
        raise TargetNotFound(f"unknown target {name!r}") from None


def register_target(
    *,
    actor: Actor,
    name: str,
    url: str,
    convention: str,
    environment: str,
    schema: str = "",
    lock_timeout_seconds: int = 60,
    requires_approval: bool | None = None,
    health_url: str = "",
) -> Target:
    """Register a target; production targets start under the two-person rule."""
    target = Target(
        name=name,
        connection_url=url,
        convention=convention,
        environment=environment,
        schema=schema,
        lock_timeout_seconds=lock_timeout_seconds,
        health_url=health_url,
        requires_approval=(
            environment == Environment.PRODUCTION
            if requires_approval is None
            else requires_approval
        ),
    )
    try:
        target.full_clean()
    except ValidationError as error:
        raise ServiceError(_validation_message(error)) from None
    return save_target(actor=actor, target=target, changed_fields=TARGET_SETTINGS)


def save_target(*, actor: Actor, target: Target, changed_fields: list[str]) -> Target:
    """Create or change a target (already validated) and record what changed, URL masked."""
    creating = target.pk is None
    permission = "migrations_ops.add_target" if creating else "migrations_ops.change_target"
    require_permission(actor, permission, "add targets" if creating else "change targets")
    details = {
        field: (target.masked_url if field == "connection_url" else getattr(target, field))
        for field in changed_fields
        if field in TARGET_SETTINGS
    }
    if creating:  # the flags it starts with; every later change is a FlagChange
        details["flags"] = selectors.flags_of(target)
    with transaction.atomic():
        stored = None if creating else Target.objects.filter(pk=target.pk).first()
        before, after = _target_changes(stored, target, changed_fields)
        target.save()
        record_audit_event(
            actor,
            "target.registered" if creating else "target.changed",
            target=target,
            details=details,
            subject=target,
            before=before,
            after=after,
        )
    return target


def _target_changes(stored: Target | None, target: Target, fields: list[str]) -> tuple[dict, dict]:
    """The changed settings as they were and became; the connection URL only masked (a
    changed password shows as such, never itself)."""

    def shown(row: Target, name: str):
        return row.masked_url if name == "connection_url" else getattr(row, name)

    before, after = {}, {}
    for name in fields:
        if name not in TARGET_SETTINGS:
            continue
        new = shown(target, name)
        if stored is None:
            after[name] = new
            continue
        if getattr(stored, name) == getattr(target, name):
            continue
        old = shown(stored, name)
        if old == new:  # only the URL's password changed
            new = f"{new} (password changed)"
        before[name], after[name] = old, new
    return before, after


def rotate_target_secrets(*, actor: Actor) -> int:
    """Encrypt every target's connection URL again with the first key of TARGET_SECRET_KEY
    (after a new key was put first): afterwards the older keys can be dropped. Returns how
    many URLs were re-encrypted."""
    require_permission(actor, "migrations_ops.change_target", "change targets")
    try:
        with transaction.atomic():
            # Read with whichever key opens each URL, written with the first.
            urls = list(Target.objects.select_for_update().values_list("pk", "connection_url"))
            for pk, url in urls:
                Target.objects.filter(pk=pk).update(connection_url=url)
            record_audit_event(actor, "targets.secrets_rotated", details={"targets": len(urls)})
    except SecretKeyError as error:
        raise ServiceError(str(error)) from None
    return len(urls)


def save_alert_thresholds(
    *, actor: Actor, thresholds: AlertThresholds, changed: list[str]
) -> AlertThresholds:
    """The fleet view's thresholds: one row (id 1), every change on the audit trail."""
    require_permission(
        actor, "migrations_ops.change_alertthresholds", "change the alert thresholds"
    )
    thresholds.pk = 1
    with transaction.atomic():
        thresholds.save()
        record_audit_event(
            actor,
            "thresholds.changed",
            details={field: getattr(thresholds, field) for field in changed},
        )
    return thresholds
