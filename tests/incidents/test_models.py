"""Timeline entries are append-only, in the model and in PostgreSQL."""

import datetime as dt

import pytest
from django.db import connection, transaction
from django.db.utils import DatabaseError

from incidents import services
from incidents.models import RecoveryObjective, Scenario, TimelineEntry
from opsconsole.append_only import AppendOnlyError

pytestmark = pytest.mark.django_db


@pytest.fixture
def entry(commander):
    incident = services.open_incident(
        actor=commander, title="t", scenario=Scenario.OTHER, severity="sev3"
    )
    return services.add_note(actor=commander, incident=incident, text="first look")


def test_timeline_entry_model_refuses_update_and_delete(entry):
    entry.text = "rewritten"
    with pytest.raises(AppendOnlyError):
        entry.save()
    with pytest.raises(AppendOnlyError):
        entry.delete()
    assert TimelineEntry.objects.get(pk=entry.pk).text == "first look"


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE incidents_timelineentry SET text = 'rewritten' WHERE id = %s",
        "DELETE FROM incidents_timelineentry WHERE id = %s",
    ],
)
def test_postgresql_refuses_update_and_delete_on_timeline_entries(entry, statement):
    assert connection.vendor == "postgresql"
    with (
        pytest.raises(DatabaseError, match="timeline entries are append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(statement, [entry.pk])
    assert TimelineEntry.objects.get(pk=entry.pk).text == "first look"


def test_queryset_update_and_delete_are_refused_by_the_database(entry):
    with pytest.raises(DatabaseError), transaction.atomic():
        TimelineEntry.objects.filter(pk=entry.pk).update(text="rewritten")
    with pytest.raises(DatabaseError), transaction.atomic():
        TimelineEntry.objects.filter(pk=entry.pk).delete()
    assert TimelineEntry.objects.get(pk=entry.pk).text == "first look"


def test_objectives_are_seeded_from_the_runbook_table():
    minutes = {
        row.scenario: tuple(
            int(value / dt.timedelta(minutes=1))
            for value in (row.detect_within, row.mitigate_within, row.recover_within)
        )
        for row in RecoveryObjective.objects.all()
    }
    assert minutes == {
        Scenario.MIGRATION_FAILURE: (1, 5, 30),
        Scenario.CONCURRENT_CONFLICT: (2, 5, 15),  # the runbook's "lock deadlock"
        Scenario.PERFORMANCE_DEGRADATION: (5, 10, 30),
        Scenario.PRODUCTION_EMERGENCY: (1, 2, 60),  # the runbook's "complete failure"
    }
