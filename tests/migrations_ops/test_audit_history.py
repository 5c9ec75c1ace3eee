"""The history auditors browse: logins, changes of incidents and targets with their fields
before → after, each object's History page, and the filtered CSV export (itself audited)."""

import csv
import gc
import io
import tracemalloc

import pytest
from django.contrib.auth.models import Group
from django.urls import reverse

from incidents import services as incident_services
from incidents.models import ActionItemKind, ActionItemStatus
from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import AuditEvent, Door
from migrations_ops.roles import AUDITOR
from opsconsole import middleware
from tests.factories import IncidentFactory, TargetFactory, UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"
EXPORT = "admin:migrations_ops_auditevent_export"


@pytest.fixture
def auditor(roles, client):
    user = UserFactory(username="auditor")
    user.groups.add(Group.objects.get(name=AUDITOR))
    client.force_login(user)
    return client


@pytest.fixture
def commander(db):
    user = UserFactory(
        username="commander",
        permissions=["incidents.add_incident", "incidents.change_incident"],
    )
    return Actor.for_user(user, Door.ADMIN)


def rows_of(response) -> list[dict]:
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


# --- logins ------------------------------------------------------------------------------------
def test_a_login_and_a_logout_are_recorded_with_address_and_request_id(client):
    UserFactory(username="alice")

    response = client.post(
        "/admin/login/",
        {"username": "alice", "password": PASSWORD},
        REMOTE_ADDR="203.0.113.10",
        HTTP_X_REQUEST_ID="login-1",
    )
    client.post("/admin/logout/", REMOTE_ADDR="203.0.113.10", HTTP_X_REQUEST_ID="logout-1")

    assert response.status_code == 302
    events = list(AuditEvent.objects.filter(action__startswith="user.log").order_by("id"))
    assert [(e.action, e.actor_name, e.door, e.ip, e.request_id) for e in events] == [
        ("user.logged_in", "alice", "admin", "203.0.113.10", "login-1"),
        ("user.logged_out", "alice", "admin", "203.0.113.10", "logout-1"),
    ]


def test_a_failed_login_records_the_name_tried_and_never_the_password(client):
    UserFactory(username="alice")

    client.post(
        "/admin/login/",
        {"username": "alice", "password": "Tr0ub4dor&3-guess"},
        REMOTE_ADDR="198.51.100.23",
        HTTP_X_REQUEST_ID="try-1",
    )

    event = AuditEvent.objects.get(action__startswith="user.log")
    assert (event.action, event.actor_name, event.ip, event.request_id) == (
        "user.login_failed",
        "alice",
        "198.51.100.23",
        "try-1",
    )
    assert event.actor_id is None
    stored = str(list(AuditEvent.objects.values()))
    assert "Tr0ub4dor" not in stored


# --- row-level history ---------------------------------------------------------------------------
def test_who_changed_the_severity_from_sev2_to_sev3_and_when(auditor, commander, roles):
    incident = IncidentFactory(severity="sev2")
    incident.severity = "sev3"
    with middleware.bound(request_id="edit-9", ip="192.0.2.4"):
        incident_services.update_incident(actor=commander, incident=incident, changed=["severity"])

    event = AuditEvent.objects.get(action="incident.changed")
    assert (event.actor_name, event.object_model, event.object_id) == (
        "commander",
        "incidents.incident",
        incident.pk,
    )
    assert (event.before, event.after) == ({"severity": "sev2"}, {"severity": "sev3"})
    assert incident.timeline.filter(text="Edited: severity").exists()  # the timeline as before

    page = auditor.get(reverse("admin:incidents_incident_history", args=[incident.pk]))

    assert page.status_code == 200
    html = page.content.decode()
    assert "<td>severity</td><td>SEV2</td><td>SEV3</td>" in html
    assert "commander" in html and "192.0.2.4" in html and "edit-9" in html
    assert event.created_at.strftime("%Y-%m-%d %H:%M:%S") in html


def test_an_action_items_history_lists_its_changes(auditor, commander, roles):
    incident = IncidentFactory()
    owner = UserFactory(username="owner")
    item = incident_services.add_action_item(
        actor=commander,
        incident=incident,
        title="Add a lock timeout",
        kind=ActionItemKind.CORRECTIVE,
        owner=owner,
    )
    incident_services.update_action_item(
        actor=commander, item=item, status=ActionItemStatus.IN_PROGRESS
    )

    changed = AuditEvent.objects.get(action="action_item.changed")
    assert (changed.before, changed.after) == ({"status": "open"}, {"status": "in_progress"})
    page = auditor.get(reverse("admin:incidents_actionitem_history", args=[item.pk]))
    html = page.content.decode()
    assert "<td>status</td><td>Open</td><td>In progress</td>" in html
    assert "action_item.added" in html


def test_a_targets_history_shows_changes_with_the_password_never(auditor, roles):
    admin = UserFactory(username="admin", is_superuser=True)
    target = TargetFactory(connection_url="postgresql://app:FIRSTSECRET@db:5432/orders")
    target.connection_url = "postgresql://app:SECONDSECRET@db:5432/orders"
    target.statement_timeout_seconds = 60
    services.save_target(
        actor=Actor.for_user(admin, Door.ADMIN),
        target=target,
        changed_fields=["connection_url", "statement_timeout_seconds"],
    )

    event = AuditEvent.objects.get(action="target.changed")
    assert event.before["statement_timeout_seconds"] == 300
    assert event.after["statement_timeout_seconds"] == 60
    assert event.after["connection_url"].endswith("(password changed)")
    page = auditor.get(reverse("admin:migrations_ops_target_history", args=[target.pk]))
    html = page.content.decode()
    assert "<td>statement_timeout_seconds</td><td>300</td><td>60</td>" in html
    assert "SECRET" not in html
    assert "SECRET" not in str(list(AuditEvent.objects.values()))


def test_a_targets_history_shows_its_flag_changes(auditor):
    target = TargetFactory()
    services.change_flags(
        actor=Actor.shell_operator(),
        target=target,
        changes={"AUTO_MIGRATE": False},
        reason="bad deploy",
    )

    page = auditor.get(reverse("admin:migrations_ops_target_history", args=[target.pk]))

    assert "<td>AUTO_MIGRATE</td><td>True</td><td>False</td>" in page.content.decode()


# --- the history browser -----------------------------------------------------------------------
def seed_events():
    alice = Actor(user=None, name="alice", door=Door.ADMIN)
    bob = Actor(user=None, name="bob", door=Door.CLI)
    alpha, beta = TargetFactory(name="alpha"), TargetFactory(name="beta")
    services.record_audit_event(alice, "operation.requested", target=alpha)
    services.record_audit_event(bob, "operation.requested", target=beta)
    services.record_audit_event(bob, '=HYPERLINK("http://evil")', target=alpha)


def test_the_browser_filters_by_user_and_shows_an_events_detail(auditor):
    seed_events()
    url = reverse("admin:migrations_ops_auditevent_changelist")

    html = auditor.get(url, {"user": "alice"}).content.decode()

    assert "alice" in html and "bob</td>" not in html
    event = AuditEvent.objects.get(actor_name="alice")
    detail = auditor.get(reverse("admin:migrations_ops_auditevent_change", args=[event.pk]))
    assert event.hash in detail.content.decode()


def test_the_export_holds_the_filtered_view_defused_and_is_itself_audited(auditor):
    seed_events()

    response = auditor.get(reverse(EXPORT), {"target": "alpha", "door": "cli"})

    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"].startswith("text/csv")
    rows = rows_of(response)
    assert [(r["user"], r["target"], r["action"]) for r in rows] == [
        ("bob", "alpha", '\'=HYPERLINK("http://evil")')
    ]
    exported = AuditEvent.objects.get(action="history.exported")
    assert exported.actor_name == "auditor"
    assert exported.details == {"filters": {"door": "cli", "target": "alpha"}}


def test_the_export_link_carries_the_changelists_filters(auditor):
    seed_events()
    url = reverse("admin:migrations_ops_auditevent_changelist")

    html = auditor.get(url, {"target": "alpha"}).content.decode()

    assert f'href="{reverse(EXPORT)}?target=alpha"' in html


def test_an_unknown_filter_exports_nothing(auditor):
    seed_events()

    response = auditor.get(reverse(EXPORT), {"no_such_filter": "1"}, follow=True)

    assert "Unknown filter: nothing exported." in response.content.decode()
    assert not AuditEvent.objects.filter(action="history.exported").exists()


def test_someone_who_may_not_view_the_history_cannot_export_it(client):
    client.force_login(UserFactory(username="visitor"))

    response = client.get(reverse(EXPORT))

    assert response.status_code == 403
    assert not AuditEvent.objects.filter(action="history.exported").exists()


def bulk_history(count: int) -> None:
    services.record_audit_events(
        [
            AuditEvent(actor_name=f"oncall-{n % 7}", door="cli", action="operation.succeeded")
            for n in range(count)
        ]
    )


def export_peak(client) -> tuple[int, int]:
    """Rows exported and the peak memory the Python heap reached while streaming them."""
    gc.collect()
    tracemalloc.start()
    try:
        response = client.get(reverse(EXPORT))
        lines = sum(chunk.count(b"\n") for chunk in response.streaming_content)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return lines - 1, peak


def test_exporting_a_large_history_does_not_grow_memory_with_its_rows(auditor):
    bulk_history(10_000)
    small_rows, small_peak = export_peak(auditor)
    bulk_history(40_000)
    large_rows, large_peak = export_peak(auditor)

    assert small_rows >= 10_000 and large_rows >= 50_000
    # Five times the rows, about the same memory: a list of 50,000 events would take tens of
    # megabytes.
    assert large_peak < 1.5 * small_peak, (small_peak, large_peak)
    assert large_peak < 10_000_000
