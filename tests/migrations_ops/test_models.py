import datetime as dt

import pytest
from django.db import connection, transaction
from django.db.utils import DatabaseError
from django.utils import timezone

from migrations_ops.actors import Actor
from migrations_ops.models import AuditEvent, LockObservation, LockState
from migrations_ops.services import record_audit_event
from opsconsole.append_only import AppendOnlyError
from tests.factories import TargetFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def event():
    return record_audit_event(Actor.shell_operator(), "target.registered", details={"a": 1})


def test_audit_event_model_refuses_update_and_delete(event):
    event.action = "something.else"
    with pytest.raises(AppendOnlyError):
        event.save()
    with pytest.raises(AppendOnlyError):
        event.delete()
    assert AuditEvent.objects.get(pk=event.pk).action == "target.registered"


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE migrations_ops_auditevent SET action = 'rewritten' WHERE id = %s",
        "DELETE FROM migrations_ops_auditevent WHERE id = %s",
    ],
)
def test_postgresql_refuses_update_and_delete_on_audit_events(event, statement):
    assert connection.vendor == "postgresql"
    with (
        pytest.raises(DatabaseError, match="audit events are append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(statement, [event.pk])
    assert AuditEvent.objects.get(pk=event.pk).action == "target.registered"


def test_queryset_update_and_delete_are_refused_by_the_database(event):
    with pytest.raises(DatabaseError), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).update(actor_name="someone else")
    with pytest.raises(DatabaseError), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).delete()
    assert AuditEvent.objects.get(pk=event.pk).actor_name == event.actor_name


def test_deleting_a_user_keeps_their_audit_history(django_user_model):
    user = django_user_model.objects.create_user("leaver")
    record_audit_event(Actor.for_user(user, "admin"), "operation.requested")
    user.delete()
    event = AuditEvent.objects.get(action="operation.requested")
    assert event.actor_name == "leaver"


@pytest.mark.parametrize(
    ("held", "locked_at_ago", "first_seen_ago", "expected"),
    [
        (None, None, None, LockState.UNKNOWN),
        (False, None, None, LockState.FREE),
        (True, 30, None, LockState.HELD),
        (True, 61, None, LockState.STALE),
        (True, None, 10, LockState.HELD),  # age unknown: only a lower bound from first sight
        (True, None, 120, LockState.STALE),
    ],
)
def test_lock_state_from_observation(held, locked_at_ago, first_seen_ago, expected):
    now = timezone.now()

    def ago(seconds):
        return None if seconds is None else now - dt.timedelta(seconds=seconds)

    observation = LockObservation(
        target=TargetFactory(),
        held=held,
        locked_at=ago(locked_at_ago),
        first_seen_held_at=ago(first_seen_ago),
    )
    assert observation.state(now, dt.timedelta(seconds=60)) == expected
    if held and locked_at_ago:
        assert observation.since_source == "target"
    if held and first_seen_ago:
        assert observation.since_source == "first_seen"
