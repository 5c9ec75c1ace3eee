"""The four history tables refuse TRUNCATE on PostgreSQL, as they refuse UPDATE and DELETE."""

import pytest
from django.db import DatabaseError, connection, transaction

from incidents.models import EntryKind, PostmortemAddendum, TimelineEntry
from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import AuditEvent, FlagChange, FlagChangeKind, FlagStage
from tests.factories import IncidentFactory, TargetFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def history():
    """One row in each protected table."""
    target = TargetFactory()
    incident = IncidentFactory()
    services.record_audit_event(Actor.shell_operator(), "target.changed")
    FlagChange.objects.create(
        target=target,
        actor_name="ops",
        door="cli",
        kind=FlagChangeKind.SET,
        reason="r",
        stage_before=FlagStage.NORMAL,
        stage_after=FlagStage.NORMAL,
    )
    TimelineEntry.objects.create(
        incident=incident, kind=EntryKind.NOTE, text="first look", actor_name="ops"
    )
    PostmortemAddendum.objects.create(incident=incident, added_by="ops", text="found later")


@pytest.mark.parametrize(
    ("model", "what"),
    [
        (AuditEvent, "audit events"),
        (FlagChange, "flag changes"),
        (TimelineEntry, "timeline entries"),
        (PostmortemAddendum, "post-mortem addenda"),
    ],
)
def test_postgresql_refuses_truncate(history, model, what):
    assert connection.vendor == "postgresql"
    table = model._meta.db_table
    with (
        pytest.raises(DatabaseError, match=f"{what} are append-only: TRUNCATE on {table} refused"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        # The test's rows are uncommitted: their deferred foreign-key checks run first.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute(f"TRUNCATE {table} CASCADE")
    assert model._base_manager.exists()
