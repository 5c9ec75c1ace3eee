"""The checklist items the console checks by itself, from a live read of real targets."""

import datetime as dt

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
