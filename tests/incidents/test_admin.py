"""The incidents admin as a commander and an auditor use it."""

import datetime as dt

import pytest
from django.contrib.auth.models import Group
from django.urls import reverse

from incidents import services
from incidents.models import Incident, RecoveryObjective, Scenario
from migrations_ops.roles import AUDITOR, INCIDENT_COMMANDER
from tests.factories import IncidentFactory, TargetFactory, UserFactory

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]


def member(client, group):
    user = UserFactory(username=group.lower().replace(" ", "-"))
    user.groups.add(Group.objects.get(name=group))
    client.force_login(user)
    return user


def test_commander_opens_an_incident_and_sees_its_timeline_in_utc(client):
    member(client, INCIDENT_COMMANDER)
    target = TargetFactory(name="billing")
    response = client.post(
        reverse("admin:incidents_incident_add"),
        {
            "title": "billing migration stuck",
            "scenario": Scenario.MIGRATION_FAILURE,
            "severity": "sev1",
            "affected_targets": [target.pk],
            "culprit_migration": "042_add_index.sql",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    incident = Incident.objects.get()
    assert list(incident.affected_targets.all()) == [target]
    assert incident.recover_objective == dt.timedelta(minutes=30)

    page = client.get(reverse("admin:incidents_incident_change", args=[incident.pk]))
    body = page.content.decode()
    assert "Opened: SEV1 Migration failure, commander incident-commander" in body
    assert f"{incident.opened_at.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC" in body


def test_commander_edits_the_post_mortem_through_the_service(client):
    member(client, INCIDENT_COMMANDER)
    incident = IncidentFactory()
    url = reverse("admin:incidents_incident_change", args=[incident.pk])
    form = {name: getattr(incident, name) for name in services.EDITABLE_FIELDS}
    # The read-only checklist inline's management form, as the page sends it.
    form |= {"checklist-TOTAL_FORMS": "0", "checklist-INITIAL_FORMS": "0"}
    response = client.post(url, {**form, "root_cause": "no CONCURRENTLY"})
    assert response.status_code == 302
    incident.refresh_from_db()
    assert incident.root_cause == "no CONCURRENTLY"
    assert incident.timeline.get().text == "Edited: root cause"


def test_changelist_filters_on_objective_breached(client):
    member(client, AUDITOR)
    start = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    late = IncidentFactory(
        title="late one",
        impact_started_at=start,
        detected_at=start + dt.timedelta(minutes=2),
        detect_objective=dt.timedelta(minutes=1),
    )
    IncidentFactory(title="no objectives", detected_at=start)
    url = reverse("admin:incidents_incident_changelist")
    breached = client.get(url, {"breached": "yes"}).content.decode()
    fine = client.get(url, {"breached": "no"}).content.decode()
    assert "late one" in breached
    assert "no objectives" not in breached
    assert "no objectives" in fine
    assert late.title not in fine


def test_auditor_reads_but_cannot_change(client):
    member(client, AUDITOR)
    incident = IncidentFactory()
    assert (
        client.get(reverse("admin:incidents_incident_change", args=[incident.pk])).status_code
        == 200
    )
    assert client.get(reverse("admin:incidents_incident_add")).status_code == 403
    objective = RecoveryObjective.objects.first()
    url = reverse("admin:incidents_recoveryobjective_change", args=[objective.pk])
    assert client.post(url, {"detect_within": "00:00:01"}).status_code == 403


def test_commander_edits_objectives_and_timeline_entries_stay_read_only(client):
    member(client, INCIDENT_COMMANDER)
    objective = RecoveryObjective.objects.get(scenario=Scenario.CONCURRENT_CONFLICT)
    response = client.post(
        reverse("admin:incidents_recoveryobjective_change", args=[objective.pk]),
        {
            "scenario": objective.scenario,
            "runbook_row": objective.runbook_row,
            "detect_within": "00:03:00",
            "mitigate_within": "00:05:00",
            "recover_within": "00:15:00",
        },
    )
    assert response.status_code == 302
    objective.refresh_from_db()
    assert objective.detect_within == dt.timedelta(minutes=3)
    assert client.get(reverse("admin:incidents_timelineentry_add")).status_code == 403


def test_roles_give_commanders_the_incidents_app_and_auditors_its_views():
    def codenames(name):
        return set(Group.objects.get(name=name).permissions.values_list("codename", flat=True))

    assert {"add_incident", "change_incident", "change_recoveryobjective"} <= codenames(
        INCIDENT_COMMANDER
    )
    assert {"view_incident", "view_timelineentry", "view_recoveryobjective"} <= codenames(AUDITOR)
    assert "change_incident" not in codenames(AUDITOR)
