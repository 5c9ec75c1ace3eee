"""The checklist items the console checks by itself, from a live read of real targets."""

import datetime as dt
import re
import time

import pytest
from django.contrib.auth.models import Group
from django.urls import reverse

from incidents import services
from incidents.models import ChecklistKey, EntryKind, Scenario
from migrations_ops import services as ops
from migrations_ops.actors import Actor
from migrations_ops.models import Door
from migrations_ops.roles import INCIDENT_COMMANDER
from tests.factories import TargetFactory, UserFactory
from tests.health_server import SLOW_SECONDS, redirect_to, refused_url, running
from tests.scripts_folder import EMAIL, USERS, write_folder

pytestmark = pytest.mark.django_db


@pytest.fixture
def billing(pg_target, tmp_path):
    """The runbook's books with 001 and 002 applied, and their scripts imported."""
    target = TargetFactory(db=pg_target, name="billing")
    ops.import_scripts(
        actor=Actor.shell_operator(),
        target=target,
        directory=write_folder(tmp_path / "m", USERS, EMAIL),
    )
    target.db = pg_target
    return target


def open_on(commander, target):
    return services.open_incident(
        actor=commander,
        title="billing rollback",
        scenario=Scenario.MIGRATION_FAILURE,
        severity="sev1",
        targets=[target],
    )


def results(incident):
    return {
        item.key: (item.result, item.evidence, item.automatic)
        for item in incident.checklist.filter(automatic=True)
    }


def test_run_checks_passes_on_a_healthy_target(commander, billing):
    billing.db.create_runbook_books()
    incident = open_on(commander, billing)

    services.run_checks(actor=commander, incident=incident)

    assert results(incident) == {
        ChecklistKey.NO_STUCK_LOCKS: ("passed", "billing: lock free", True),
        ChecklistKey.TRACKING_CONSISTENT: (
            "passed",
            "billing: books consistent, 2 applied, 2 scripts",
            True,
        ),
    }
    assert incident.checklist.filter(result="pending").count() == 4
    assert incident.timeline.filter(kind=EntryKind.CHECKLIST).count() == 2


def test_run_checks_fails_the_lock_with_its_holder(commander, billing):
    billing.db.create_runbook_books(lock_age=dt.timedelta(minutes=20), applied=USERS[:1])
    incident = open_on(commander, billing)

    services.run_checks(actor=commander, incident=incident)

    found = results(incident)
    lock_result, lock_evidence, _ = found[ChecklistKey.NO_STUCK_LOCKS]
    assert lock_result == "failed"
    assert lock_evidence.startswith("billing: lock held by deploy-7f3a (pid 4121) since ")
    # 002 rolled back: pending is what a rollback leaves, not an inconsistency.
    assert found[ChecklistKey.TRACKING_CONSISTENT][:2] == (
        "passed",
        "billing: books consistent, 1 applied, 2 scripts (002_add_email.sql is pending)",
    )
    entry = incident.timeline.filter(kind=EntryKind.CHECKLIST).first()
    assert "No stuck locks failed (automatically): billing: lock held by deploy-7f3a" in entry.text


def test_run_checks_fails_books_that_name_unknown_migrations(commander, billing):
    billing.db.create_runbook_books(applied=(USERS[0], EMAIL[0], "003_mystery.sql"))
    incident = open_on(commander, billing)

    services.run_checks(actor=commander, incident=incident)

    assert results(incident)[ChecklistKey.TRACKING_CONSISTENT][:2] == (
        "failed",
        "billing: 003_mystery.sql is applied but no script is known for it",
    )


def test_run_checks_needs_an_affected_target(commander):
    incident = services.open_incident(
        actor=commander, title="t", scenario=Scenario.OTHER, severity="sev3"
    )
    with pytest.raises(ops.InvalidRequest, match="no affected targets"):
        services.run_checks(actor=commander, incident=incident)


@pytest.mark.usefixtures("roles")
def test_commander_runs_checks_from_the_admin_and_sees_the_checklist(client, billing):
    user = UserFactory(username="on-duty")
    user.groups.add(Group.objects.get(name=INCIDENT_COMMANDER))
    client.force_login(user)
    billing.db.create_runbook_books(lock_age=dt.timedelta(minutes=20))
    incident = open_on(Actor.for_user(user, Door.ADMIN), billing)

    response = client.post(
        reverse("admin:incidents_incident_changelist"),
        {"action": "run_checks", "_selected_action": [incident.pk]},
        follow=True,
    )
    assert f"#{incident.pk}: No stuck locks failed, Migration tracking consistent passed" in (
        response.content.decode()
    )
    page = client.get(reverse("admin:incidents_incident_change", args=[incident.pk]))
    body = page.content.decode()
    assert "billing: lock held by deploy-7f3a (pid 4121)" in body
    assert "No migration attempts in logs" in body


# --- API endpoints responding: the targets' health URLs ---------------------------------------
def api_item(incident):
    item = incident.checklist.get(key=ChecklistKey.API_RESPONDING)
    return item.result, item.evidence, item.automatic


@pytest.mark.parametrize(
    ("path", "result", "said"),
    [
        ("/ok", "passed", r"answered 200 in \d+ ms"),
        ("/down", "failed", r"answered 503 in \d+ ms"),
        ("/slow", "failed", r"did not answer within 0\.3 s"),
    ],
)
def test_run_checks_asks_the_health_url(
    commander, billing, health_server, settings, path, result, said
):
    settings.HEALTH_CHECK_TIMEOUT = 0.3
    billing.db.create_runbook_books()
    billing.health_url = f"{health_server}{path}"
    billing.save()
    incident = open_on(commander, billing)

    items = services.run_checks(actor=commander, incident=incident)

    assert [item.key for item in items] == [
        ChecklistKey.NO_STUCK_LOCKS,
        ChecklistKey.TRACKING_CONSISTENT,
        ChecklistKey.API_RESPONDING,
    ]
    found, evidence, automatic = api_item(incident)
    assert (found, automatic) == (result, True)
    assert re.fullmatch(rf"billing: {re.escape(billing.health_url)} {said}", evidence), evidence
    entry = incident.timeline.filter(kind=EntryKind.CHECKLIST).last()
    assert entry.text == f"Checklist: API endpoints responding {result} (automatically): {evidence}"


def test_a_refused_connection_fails_the_item(commander, billing):
    billing.db.create_runbook_books()
    billing.health_url = refused_url()
    billing.save()
    incident = open_on(commander, billing)

    services.run_checks(actor=commander, incident=incident)

    assert api_item(incident) == (
        "failed",
        f"billing: {billing.health_url} could not be reached",
        True,
    )


def test_without_a_health_url_the_item_stays_for_a_person(commander, billing):
    billing.db.create_runbook_books()
    incident = open_on(commander, billing)

    items = services.run_checks(actor=commander, incident=incident)

    assert ChecklistKey.API_RESPONDING not in [item.key for item in items]
    assert api_item(incident) == ("pending", "", False)
    assert incident.timeline.filter(kind=EntryKind.CHECKLIST).count() == 2


def test_targets_without_a_health_url_leave_a_passing_item_pending(
    commander, billing, health_server
):
    billing.db.create_runbook_books()
    billing.health_url = f"{health_server}/ok"
    billing.save()
    orders = TargetFactory(name="orders")
    incident = services.open_incident(
        actor=commander,
        title="two apps",
        scenario=Scenario.MIGRATION_FAILURE,
        severity="sev2",
        targets=[billing, orders],
    )

    services.run_checks(actor=commander, incident=incident)

    result, evidence, automatic = api_item(incident)
    assert (result, automatic) == ("pending", True)
    assert re.fullmatch(
        rf"billing: {re.escape(billing.health_url)} answered 200 in \d+ ms; "
        r"orders: no health URL, for a person to check",
        evidence,
    ), evidence

    # One failing endpoint fails the item, whatever the others.
    billing.health_url = f"{health_server}/down"
    billing.save()
    services.run_checks(actor=commander, incident=incident)
    assert api_item(incident)[0] == "failed"


# --- outbound HTTP: credentials, destinations, one deadline -------------------------------------
def test_the_health_urls_credentials_stay_with_their_origin(commander, billing, health_server):
    billing.db.create_runbook_books()
    with running() as elsewhere:
        start = redirect_to(health_server, f"{elsewhere.url}/private")
        billing.health_url = start.replace("http://", "http://probe:s3cret@")
        billing.save()

        services.run_checks(actor=commander, incident=open_on(commander, billing))

        assert [path for path, _ in elsewhere.seen] == ["/private"]
        assert "Authorization" not in elsewhere.seen[0][1]
    result, evidence, _ = api_item(billing.incidents.get())
    assert result == "failed"
    assert "answered 401" in evidence
    assert "s3cret" not in evidence


def test_loopback_and_private_health_urls_are_refused_alike(
    commander, billing, health_server, settings
):
    """Without HEALTH_CHECK_ALLOWED_NETWORKS naming them, the console's own machine, its
    network and the cloud metadata service are not asked, and an open port reads like a
    closed one."""
    settings.HEALTH_CHECK_ALLOWED_NETWORKS = []
    billing.db.create_runbook_books()
    billing.health_url = f"{health_server}/ok"  # open
    billing.save()
    urls = {
        "closed": refused_url(),
        "redis": "http://127.0.0.1:6379/",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "private": "http://10.0.0.1/health",
    }
    others = [TargetFactory(name=name, health_url=url) for name, url in urls.items()]
    incident = services.open_incident(
        actor=commander,
        title="everywhere",
        scenario=Scenario.MIGRATION_FAILURE,
        severity="sev2",
        targets=[billing, *others],
    )

    services.run_checks(actor=commander, incident=incident)

    result, evidence, _ = api_item(incident)
    assert result == "failed"
    said = dict(part.split(": ", 1) for part in evidence.split("; "))
    assert said == {
        "billing": f"{health_server}/ok refused by the destination policy",
        **{name: f"{url} refused by the destination policy" for name, url in urls.items()},
    }


@pytest.mark.usefixtures("roles")
def test_run_checks_in_the_admin_cuts_a_trickling_health_url_at_the_deadline(
    client, billing, health_server, settings
):
    settings.HEALTH_CHECK_TIMEOUT = 1.0
    user = UserFactory(username="on-duty")
    user.groups.add(Group.objects.get(name=INCIDENT_COMMANDER))
    client.force_login(user)
    billing.db.create_runbook_books()
    billing.health_url = f"{health_server}/trickle-headers"  # a byte every half second
    billing.save()
    incident = open_on(Actor.for_user(user, Door.ADMIN), billing)

    started = time.monotonic()
    response = client.post(
        reverse("admin:incidents_incident_changelist"),
        {"action": "run_checks", "_selected_action": [incident.pk]},
        follow=True,
    )
    took = time.monotonic() - started

    assert response.status_code == 200
    assert "API endpoints responding failed" in response.content.decode()
    assert api_item(incident)[:2] == (
        "failed",
        f"billing: {billing.health_url} did not answer within 1 s",
    )
    assert took < 2.5, took


@pytest.mark.usefixtures("roles")
def test_run_checks_in_the_admin_asks_five_slow_health_urls_at_once(
    client, billing, health_server, settings
):
    """Five endpoints each slower than the deadline: the admin answers after about one
    deadline, not five."""
    settings.HEALTH_CHECK_TIMEOUT = 1.0
    assert SLOW_SECONDS > 1.0
    user = UserFactory(username="on-duty")
    user.groups.add(Group.objects.get(name=INCIDENT_COMMANDER))
    client.force_login(user)
    billing.db.create_runbook_books()
    billing.health_url = f"{health_server}/slow"
    billing.save()
    slow = [TargetFactory(name=f"slow-{n}", health_url=f"{health_server}/slow") for n in range(4)]
    incident = services.open_incident(
        actor=Actor.for_user(user, Door.ADMIN),
        title="five apps",
        scenario=Scenario.MIGRATION_FAILURE,
        severity="sev2",
        targets=[billing, *slow],
    )

    started = time.monotonic()
    response = client.post(
        reverse("admin:incidents_incident_changelist"),
        {"action": "run_checks", "_selected_action": [incident.pk]},
        follow=True,
    )
    took = time.monotonic() - started

    assert response.status_code == 200
    result, evidence, _ = api_item(incident)
    assert result == "failed"
    assert evidence.count("did not answer within 1 s") == 5
    assert 1.0 <= took < 2.5, took
