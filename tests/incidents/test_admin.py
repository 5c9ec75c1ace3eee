"""The incidents admin as a commander and an auditor use it."""

import datetime as dt

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.urls import reverse

from incidents import services
from incidents.models import (
    EntryKind,
    EscalationContact,
    Incident,
    IncidentStatus,
    RecoveryObjective,
    Scenario,
)
from migrations_ops.actors import Actor
from migrations_ops.models import Door
from migrations_ops.roles import AUDITOR, CONSOLE_ADMIN, INCIDENT_COMMANDER
from tests.factories import IncidentFactory, TargetFactory, UserFactory

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]


def member(client, group):
    user = UserFactory(username=group.lower().replace(" ", "-"))
    user.groups.add(Group.objects.get(name=group))
    client.force_login(user)
    return user


def change_form(incident):
    """The change form as the page sends it, with the read-only inlines' management forms."""
    form = {name: getattr(incident, name) for name in services.EDITABLE_FIELDS}
    for prefix in ("checklist", "action_items"):
        form |= {f"{prefix}-TOTAL_FORMS": "0", f"{prefix}-INITIAL_FORMS": "0"}
    return form


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
    response = client.post(url, {**change_form(incident), "root_cause": "no CONCURRENTLY"})
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


# --- running the incident from its page ------------------------------------------------------
def page_url(incident):
    return reverse("admin:incidents_incident_change", args=[incident.pk])


def act(client, incident, slug, data):
    """POST one of the page's forms; returns the messages shown on the page it lands on."""
    url = reverse("admin:incidents_incident_act", args=[incident.pk, slug])
    response = client.post(url, data, follow=True)
    assert response.redirect_chain == [(page_url(incident), 302)]
    return [(message.level_tag, message.message) for message in response.context["messages"]]


def opened(user, **kwargs):
    return services.open_incident(
        actor=Actor.for_user(user, Door.ADMIN),
        title="orders lock stuck",
        scenario=Scenario.CONCURRENT_CONFLICT,
        severity="sev2",
        **kwargs,
    )


@pytest.fixture
def commander_client(client):
    user = member(client, INCIDENT_COMMANDER)
    client.user = user
    return client


def closed_incident(user):
    actor = Actor.for_user(user, Door.ADMIN)
    incident = opened(user)
    services.change_status(actor=actor, incident=incident, status=IncidentStatus.RESOLVED)
    for item in incident.checklist.all():
        services.tick_checklist_item(actor=actor, item=item, passed=True, evidence="seen")
    incident.root_cause = "deploy crashed holding the lock"
    incident.no_action_items_reason = "the deploy tool is retired"
    services.update_incident(
        actor=actor, incident=incident, changed=["root_cause", "no_action_items_reason"]
    )
    return services.change_status(actor=actor, incident=incident, status=IncidentStatus.CLOSED)


def test_the_add_form_offers_a_commander_defaulting_to_the_requester(commander_client):
    page = commander_client.get(reverse("admin:incidents_incident_add")).content.decode()
    assert f'<option value="{commander_client.user.pk}" selected>incident-commander' in page
    other = UserFactory(username="second")
    other.groups.add(Group.objects.get(name=INCIDENT_COMMANDER))
    response = commander_client.post(
        reverse("admin:incidents_incident_add"),
        {"title": "t", "scenario": Scenario.OTHER, "severity": "sev3", "commander": other.pk},
    )
    assert response.status_code == 302
    incident = Incident.objects.get()
    assert (incident.commander, incident.opened_by) == (other, "incident-commander")


def test_the_page_shows_only_forward_statuses_and_each_levels_contact(commander_client):
    incident = opened(commander_client.user)
    services.change_status(
        actor=Actor.for_user(commander_client.user, Door.ADMIN),
        incident=incident,
        status=IncidentStatus.MITIGATING,
    )
    page = commander_client.get(page_url(incident)).content.decode()
    status_select = page.split('name="status"', 1)[1].split("</select>", 1)[0]
    assert 'value="monitoring"' in status_select
    assert 'value="detected"' not in status_select
    assert 'value="mitigating"' not in status_select
    assert "Database team: Email: database-team@example.com, Slack: #incidents" in page
    assert reverse("admin:incidents_incident_postmortem", args=[incident.pk]) in page


def test_commander_changes_status_sets_timestamps_and_escalates(commander_client):
    incident = opened(commander_client.user)
    assert act(commander_client, incident, "status", {"status": "mitigating"}) == [
        ("success", f"Incident #{incident.pk} is now mitigating.")
    ]
    assert act(
        commander_client,
        incident,
        "timestamp",
        {"name": "impact_started", "when": "2026-01-02 03:04:05"},
    ) == [("success", "Impact started set to 2026-01-02 03:04:05 UTC.")]
    act(commander_client, incident, "escalate", {"level": "2", "reason": "schema drift"})
    incident.refresh_from_db()
    assert incident.status == IncidentStatus.MITIGATING
    assert incident.impact_started_at == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert incident.escalation_level == 2
    assert "reaches Database team" in incident.timeline.get(kind=EntryKind.ESCALATION).text


def test_commander_hands_over_notes_and_corrects(commander_client):
    incident = opened(commander_client.user)
    other = UserFactory(username="second")
    other.groups.add(Group.objects.get(name=INCIDENT_COMMANDER))
    act(commander_client, incident, "commander", {"commander": other.pk})
    act(commander_client, incident, "note", {"text": "lock held by deploy-41"})
    note = incident.timeline.get(kind=EntryKind.NOTE)
    messages_shown = act(
        commander_client, incident, "correct", {"entry": note.pk, "text": "deploy-42"}
    )
    correction = incident.timeline.get(kind=EntryKind.CORRECTION)
    assert messages_shown == [("success", f"Entry #{note.pk} corrected by entry #{correction.pk}.")]
    incident.refresh_from_db()
    assert incident.commander_name == "second"
    assert correction.corrects == note


def test_commander_ticks_the_checklist_and_adds_and_updates_action_items(commander_client):
    incident = opened(commander_client.user)
    item = incident.checklist.get(key="monitoring_normal")
    act(
        commander_client,
        incident,
        "checklist",
        {"item": item.pk, "result": "passed", "evidence": "dashboards green 15 min"},
    )
    item.refresh_from_db()
    assert (item.result, item.evidence) == ("passed", "dashboards green 15 min")

    act(
        commander_client,
        incident,
        "action-item",
        {
            "title": "alert on old locks",
            "kind": "detective",
            "owner": commander_client.user.pk,
            "due_date": "2026-12-01",
            "link": "https://tracker.example.com/OPS-1",
        },
    )
    action = incident.action_items.get()
    assert (action.owner_name, action.due_date) == ("incident-commander", dt.date(2026, 12, 1))
    assert act(
        commander_client,
        incident,
        "update-action-item",
        {"item": action.pk, "status": "in_progress", "due_date": "", "owner": "", "link": ""},
    ) == [("success", f"Action item #{action.pk} updated.")]
    action.refresh_from_db()
    assert (action.status, action.due_date) == ("in_progress", dt.date(2026, 12, 1))
    page = commander_client.get(page_url(incident)).content.decode()
    assert "alert on old locks" in page  # the read-only inline


def test_errors_are_one_message_and_change_nothing(commander_client):
    incident = opened(commander_client.user)
    before = incident.timeline.count()
    assert act(
        commander_client, incident, "timestamp", {"name": "recovered", "when": "2020-01-01"}
    ) == [
        (
            "error",
            f"recovered (2020-01-01 00:00:00 UTC) cannot be before detected "
            f"({services.utc(incident.detected_at)})",
        )
    ]
    assert act(commander_client, incident, "status", {"status": "detected"}) == [
        ("error", "Status: Select a valid choice. detected is not one of the available choices.")
    ]
    assert act(commander_client, incident, "note", {"text": ""}) == [
        ("error", "Note: This field is required.")
    ]
    assert act(commander_client, incident, "addendum", {"text": "too early"}) == [
        (
            "error",
            f"incident #{incident.pk} is not closed: edit its post-mortem instead of "
            "adding an addendum",
        )
    ]
    incident.refresh_from_db()
    assert incident.recovered_at is None
    assert incident.timeline.count() == before


@pytest.mark.parametrize(
    ("slug", "data"),
    [
        ("status", {"status": "mitigating"}),
        ("timestamp", {"name": "impact_started", "when": "2026-01-02 03:04:05"}),
        ("escalate", {"level": "3", "reason": "r"}),
        ("note", {"text": "n"}),
        ("action-item", {"title": "t", "kind": "corrective", "owner": "OWNER"}),
    ],
)
def test_without_change_permission_nothing_changes(client, slug, data):
    commander = UserFactory(username="boss")
    commander.groups.add(Group.objects.get(name=INCIDENT_COMMANDER))
    incident = opened(commander)
    auditor = member(client, AUDITOR)
    data = {name: auditor.pk if value == "OWNER" else value for name, value in data.items()}

    [(level, message)] = act(client, incident, slug, data)
    assert level == "error"
    assert message.startswith("auditor is not allowed to ")
    incident.refresh_from_db()
    assert (incident.status, incident.escalation_level) == (IncidentStatus.DETECTED, 1)
    assert incident.impact_started_at is None
    assert incident.timeline.count() == 1
    assert incident.action_items.count() == 0
    # And the page offers them no form.
    assert 'id="incident-actions"' not in client.get(page_url(incident)).content.decode()


def test_the_forms_need_the_csrf_token(commander_client):
    incident = opened(commander_client.user)
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(commander_client.user)
    url = reverse("admin:incidents_incident_act", args=[incident.pk, "note"])
    assert strict.post(url, {"text": "forged"}).status_code == 403
    assert incident.timeline.count() == 1


def test_a_closed_incident_is_frozen_on_its_page_and_takes_addenda(commander_client):
    incident = closed_incident(commander_client.user)
    page = commander_client.get(page_url(incident)).content.decode()
    assert 'name="root_cause"' not in page
    assert "deploy crashed holding the lock" in page
    assert 'id="form-addendum"' in page
    assert 'id="form-status"' not in page

    response = commander_client.post(
        page_url(incident), {**change_form(incident), "root_cause": "rewritten"}
    )
    assert response.status_code == 302
    incident.refresh_from_db()
    assert incident.root_cause == "deploy crashed holding the lock"

    act(commander_client, incident, "addendum", {"text": "also seen on staging"})
    assert incident.addenda.get().text == "also seen on staging"
    assert "also seen on staging" in commander_client.get(page_url(incident)).content.decode()


def test_the_post_mortem_downloads_as_markdown(commander_client):
    incident = closed_incident(commander_client.user)
    response = commander_client.get(
        reverse("admin:incidents_incident_postmortem", args=[incident.pk])
    )
    assert response.status_code == 200
    assert response["Content-Type"] == "text/markdown; charset=utf-8"
    assert response["Content-Disposition"] == (
        f'attachment; filename="incident-{incident.pk}-postmortem.md"'
    )
    markdown = response.content.decode()
    assert markdown.startswith(f"# Post-mortem: incident #{incident.pk} — orders lock stuck")
    closing = incident.timeline.get(kind=EntryKind.STATUS, details__after="closed")
    assert f"| {services.utc(closing.occurred_at)} | incident-commander | {closing.text} |" in (
        markdown
    )


def test_escalation_contacts_are_edited_in_the_admin_and_addenda_are_not(commander_client):
    contact = EscalationContact.objects.get(level=3)
    response = commander_client.post(
        reverse("admin:incidents_escalationcontact_change", args=[contact.pk]),
        {"level": 3, "team": "Platform team", "reaches": "Slack: #platform\nPagerDuty: infra"},
    )
    assert response.status_code == 302
    contact.refresh_from_db()
    assert contact.reaches == "Slack: #platform\nPagerDuty: infra"
    console_admins = Group.objects.get(name=CONSOLE_ADMIN).permissions
    assert console_admins.filter(codename="change_escalationcontact").exists()
    assert (
        commander_client.get(reverse("admin:incidents_postmortemaddendum_add")).status_code == 403
    )
    assert commander_client.get(reverse("admin:incidents_actionitem_add")).status_code == 403
