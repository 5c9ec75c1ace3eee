"""The two-person rule: operations on targets that require approval wait for a second person."""

import datetime as dt

import pytest
from django.utils import timezone

from migrations_ops import audit_witness, services
from migrations_ops.actors import Actor
from migrations_ops.models import AuditEvent, Door, Environment, Operation, OperationStatus
from migrations_ops.roles import AUDITOR, INCIDENT_COMMANDER, ON_CALL
from tests.factories import TargetFactory, UserFactory

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]

STALE = dt.timedelta(minutes=20)


def in_group(name, username):
    from django.contrib.auth.models import Group

    user = UserFactory(username=username)
    user.groups.add(Group.objects.get(name=name))
    return Actor.for_user(user, Door.ADMIN)


@pytest.fixture
def prod(pg_target):
    pg_target.create_runbook_books(lock_age=STALE, locked_by="crashed deploy")
    target = TargetFactory(
        db=pg_target, name="orders-prod", environment=Environment.PRODUCTION, requires_approval=True
    )
    target.db = pg_target
    return target


def request_unlock(actor, target):
    return services.request_force_unlock(
        actor=actor, target=target, reason="stuck", confirm_name=target.name
    )


def test_a_second_person_approves_and_the_operation_runs(prod, django_capture_on_commit_callbacks):
    oncall = in_group(ON_CALL, "oncall")
    commander = in_group(INCIDENT_COMMANDER, "commander")
    with django_capture_on_commit_callbacks(execute=True) as sent:
        operation = request_unlock(oncall, prod)
    assert operation.status == OperationStatus.AWAITING_APPROVAL
    # Nothing is sent to the worker before approval (the audit witness moves, as on any commit).
    assert [c for c in sent if getattr(c, "func", None) is not audit_witness.committed] == []
    assert len(prod.db.runbook_lock_rows()) == 1

    with django_capture_on_commit_callbacks(execute=True):
        services.approve_operation(actor=commander, operation=operation, reason="agreed on call")
    operation.refresh_from_db()
    assert operation.status == OperationStatus.SUCCEEDED
    assert operation.approved_by_name == "commander"
    assert prod.db.runbook_lock_rows() == []
    trail = list(
        AuditEvent.objects.filter(operation=operation)
        .order_by("id")
        .values_list("action", "actor_name")
    )
    assert trail[:2] == [("operation.requested", "oncall"), ("operation.approved", "commander")]


def test_nobody_approves_their_own_request(prod):
    commander = in_group(INCIDENT_COMMANDER, "commander")
    operation = request_unlock(commander, prod)
    assert operation.status == OperationStatus.AWAITING_APPROVAL  # the target requires approval
    with pytest.raises(services.PermissionDenied, match="a different person must approve it"):
        services.approve_operation(actor=commander, operation=operation)
    operation.refresh_from_db()
    assert operation.status == OperationStatus.AWAITING_APPROVAL


def test_approving_needs_the_permission_and_an_operation_awaiting_it(prod):
    operation = request_unlock(in_group(ON_CALL, "oncall"), prod)
    for role, name in [(ON_CALL, "other-oncall"), (AUDITOR, "auditor")]:
        with pytest.raises(services.PermissionDenied, match="not allowed to approve"):
            services.approve_operation(actor=in_group(role, name), operation=operation)
    commander = in_group(INCIDENT_COMMANDER, "commander")
    services.reject_operation(actor=commander, operation=operation, reason="wait for the DBA")
    operation.refresh_from_db()
    assert operation.status == OperationStatus.CANCELLED
    assert operation.error == "rejected by commander: wait for the DBA"
    with pytest.raises(services.ServiceError, match="is cancelled, not awaiting approval"):
        services.approve_operation(actor=commander, operation=operation)
    assert len(prod.db.runbook_lock_rows()) == 1


def test_a_rejection_needs_a_reason(prod):
    operation = request_unlock(in_group(ON_CALL, "oncall"), prod)
    with pytest.raises(services.InvalidRequest, match="a reason is required"):
        services.reject_operation(
            actor=in_group(INCIDENT_COMMANDER, "commander"), operation=operation, reason=""
        )


def test_requests_expire(prod, settings):
    settings.OPERATION_APPROVAL_TTL = 60
    operation = request_unlock(in_group(ON_CALL, "oncall"), prod)
    Operation.objects.filter(pk=operation.pk).update(
        requested_at=timezone.now() - dt.timedelta(minutes=5)
    )
    operation.refresh_from_db()
    with pytest.raises(services.ServiceError, match="has expired; request it again"):
        services.approve_operation(actor=in_group(INCIDENT_COMMANDER, "c"), operation=operation)
    operation.refresh_from_db()
    assert operation.status == OperationStatus.CANCELLED
    assert AuditEvent.objects.filter(operation=operation, action="operation.expired").exists()
    assert len(prod.db.runbook_lock_rows()) == 1


def test_production_changes_by_someone_who_may_not_approve_always_wait(pg_target):
    """Even with the target's own approval switch off."""
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(
        db=pg_target, name="p", environment=Environment.PRODUCTION, requires_approval=False
    )
    assert request_unlock(in_group(ON_CALL, "oncall"), target).status == "awaiting_approval"


def test_dry_runs_and_verify_never_wait(prod, tmp_path):
    from tests.scripts_folder import EMAIL, USERS, write_folder

    oncall = in_group(ON_CALL, "oncall")
    services.import_scripts(
        actor=Actor.shell_operator(), target=prod, directory=write_folder(tmp_path, USERS, EMAIL)
    )
    assert services.request_verify(actor=oncall, target=prod).status == "queued"


def test_roles_hold_what_the_runbook_gives_them():
    from django.contrib.auth.models import Group

    def codenames(name):
        return set(Group.objects.get(name=name).permissions.values_list("codename", flat=True))

    assert all(code.startswith("view_") for code in codenames(AUDITOR))
    assert {"view_operation", "view_auditevent", "view_target"} <= codenames(AUDITOR)
    assert {"force_unlock_target", "run_migrations", "dry_run_migrations"} <= codenames(ON_CALL)
    assert "approve_operation" not in codenames(ON_CALL)
    assert "approve_operation" in codenames(INCIDENT_COMMANDER)
    assert {"add_target", "change_user", "change_periodictask"} <= codenames("Console admin")
    assert "force_unlock_target" not in codenames("Console admin")


def test_register_puts_production_under_the_two_person_rule():
    admin = Actor.shell_operator()
    prod = services.register_target(
        actor=admin,
        name="p",
        url="sqlite:////tmp/p.db",
        convention="runbook",
        environment="production",
    )
    staging = services.register_target(
        actor=admin,
        name="s",
        url="sqlite:////tmp/s.db",
        convention="runbook",
        environment="staging",
    )
    assert prod.requires_approval is True and staging.requires_approval is False


def test_the_sweeper_expires_requests_nobody_approved(prod, settings):
    settings.OPERATION_APPROVAL_TTL = 60
    operation = request_unlock(in_group(ON_CALL, "oncall"), prod)
    assert services.sweep_operations().expired == []
    report = services.sweep_operations(now=timezone.now() + dt.timedelta(minutes=2))
    assert report.expired == [operation.pk]
    assert f"operation #{operation.pk}: not approved within 60 s, expired" in report.lines()
    operation.refresh_from_db()
    assert operation.status == OperationStatus.CANCELLED
