"""The audit trail's writes: events, history exports, logins (heard through auth signals).

The login receivers are connected on import (importing the package imports this module).
"""

from __future__ import annotations

from functools import partial

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db import transaction
from django.dispatch import receiver

from migrations_ops import audit_chain, audit_witness
from migrations_ops.actors import Actor
from migrations_ops.models import AuditEvent, Door, Operation, Target
from migrations_ops.services.errors import require_permission
from opsconsole import middleware as request_context


def record_audit_event(
    actor: Actor,
    action: str,
    *,
    target: Target | None = None,
    operation: Operation | None = None,
    details: dict | None = None,
    subject=None,
    before: dict | None = None,
    after: dict | None = None,
) -> AuditEvent:
    """Append an event to the audit trail's hash chain, in the caller's transaction: write it
    last there (``audit_chain``: the chain's lock is the last one a transaction takes).

    ``subject``: the object a change is about (its History page lists the event), with the
    changed fields' ``before`` and ``after`` values. The request's id and client address come
    from the request being served (``opsconsole.middleware``), if any."""
    context = request_context.current()
    event = AuditEvent(
        actor=actor.user,
        actor_name=actor.name[:150],
        door=actor.door,
        action=action,
        target=target,
        target_name=target.name if target else "",
        operation=operation,
        details=details or {},
        ip=context.ip,
        request_id=context.request_id,
        object_model=subject._meta.label_lower if subject is not None else "",
        object_id=subject.pk if subject is not None else None,
        before=before or {},
        after=after or {},
    )
    with transaction.atomic(savepoint=False):
        audit_chain.append(event)
        _witness_on_commit(first=event, last=event)
    return event


def record_audit_events(events: list[AuditEvent]) -> list[AuditEvent]:
    """Append many ready-made events at once, chained in list order (imports, benchmarks)."""
    with transaction.atomic(savepoint=False):
        created = audit_chain.append_many(AuditEvent, events)
        if created:
            _witness_on_commit(first=created[0], last=created[-1])
    return created


def _witness_on_commit(*, first: AuditEvent, last: AuditEvent) -> None:
    """Once the events are committed (never before: a rolled-back event must not be
    witnessed), move the audit witness to the last, in the background. A failure to write the
    witness is logged, never the request's."""
    transaction.on_commit(
        partial(
            audit_witness.committed,
            AuditEvent,
            last_id=last.pk,
            last_hash=last.hash,
            linked_to=first.previous_hash,
        ),
        robust=True,
    )


def record_history_export(*, actor: Actor, filters: dict) -> AuditEvent:
    """An export of the history is itself on it, with the filters and search it was made with
    (recorded as it starts: how many rows it holds is known only once streamed)."""
    require_permission(actor, "migrations_ops.view_auditevent", "export the audit trail")
    return record_audit_event(actor, "history.exported", details={"filters": filters})


@receiver(user_logged_in, dispatch_uid="audit_user_logged_in")
def _logged_in(sender, request, user, **kwargs) -> None:
    record_audit_event(Actor.for_user(user, Door.ADMIN), "user.logged_in")


@receiver(user_logged_out, dispatch_uid="audit_user_logged_out")
def _logged_out(sender, request, user, **kwargs) -> None:
    if user is not None:
        record_audit_event(Actor.for_user(user, Door.ADMIN), "user.logged_out")


@receiver(user_login_failed, dispatch_uid="audit_user_login_failed")
def _login_failed(sender, credentials, request=None, **kwargs) -> None:
    """The user name tried, never the password (Django hides it from ``credentials`` too)."""
    field = get_user_model().USERNAME_FIELD
    tried = str(credentials.get(field) or credentials.get("username") or "")[:150]
    record_audit_event(
        Actor(user=None, name=tried or "(no user name)", door=Door.ADMIN),
        "user.login_failed",
        details={"username": tried},
    )
