"""Every door that changes who may do what leaves an audit event with before and after:
``createsuperuser``, ``changepassword``, a shell, TOTP devices; and the rules hold below the
admin, for any code running with a user acting (the model signals)."""

import io

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management import call_command
from django.db import transaction
from django_otp.plugins.otp_totp.models import TOTPDevice

from migrations_ops import services
from migrations_ops.models import AuditEvent
from migrations_ops.roles import CONSOLE_ADMIN
from opsconsole import middleware
from tests.factories import UserFactory, member

pytestmark = pytest.mark.django_db
User = get_user_model()


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("id"))


def acting_as(user):
    """What ActingUserMiddleware binds while a request of ``user`` is served."""
    return middleware.bound_user(user, door="admin")


def test_createsuperuser_is_recorded_from_the_cli(monkeypatch):
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "a long enough password 42")
    call_command(
        "createsuperuser",
        "--noinput",
        "--username",
        "root",
        "--email",
        "r@example.com",
        stdout=io.StringIO(),
    )

    (created,) = events("user.created")
    assert created.door == "cli"
    assert created.after["is_superuser"] is True
    assert created.after["is_staff"] is True
    assert "password" not in created.after
    assert created.object_id == User.objects.get(username="root").pk


def test_changepassword_records_that_it_changed_never_the_hash(monkeypatch):
    user = UserFactory(username="carol")
    monkeypatch.setattr("getpass.getpass", lambda prompt="": "another long password 42")

    call_command("changepassword", "carol", stdout=io.StringIO())

    (changed,) = events("user.password_changed")
    assert (changed.door, changed.object_id, changed.before, changed.after) == (
        "cli",
        user.pk,
        {},
        {},
    )
    user.refresh_from_db()
    assert user.password[:20] not in str(
        list(AuditEvent.objects.values_list("details", "before", "after"))
    )


def test_flags_groups_deletion_are_recorded_from_a_shell(roles):
    user = UserFactory(username="dave", is_staff=False)
    user.is_staff = True
    user.is_active = False
    user.save()
    user.groups.add(Group.objects.get(name=CONSOLE_ADMIN))
    user.delete()

    (changed,) = events("user.changed")
    assert (changed.before, changed.after) == (
        {"is_staff": False, "is_active": True},
        {"is_staff": True, "is_active": False},
    )
    groups = [e for e in events("user.groups_changed") if e.details["name"] == "dave"]
    assert [(e.before, e.after) for e in groups] == [({"groups": []}, {"groups": [CONSOLE_ADMIN]})]
    (deleted,) = events("user.deleted")
    assert deleted.before["groups"] == [CONSOLE_ADMIN]
    assert deleted.before["username"] == "dave"


def test_groups_created_and_deleted_are_recorded():
    group = Group.objects.create(name="Release managers")
    group.delete()

    assert [e.after for e in events("group.created")] == [{"name": "Release managers"}]
    assert [e.before["name"] for e in events("group.deleted")] == ["Release managers"]


def test_totp_devices_added_confirmed_and_removed_are_recorded():
    user = UserFactory(username="erin")
    device = TOTPDevice.objects.create(user=user, name="phone", confirmed=False)
    device.confirmed = True
    device.save()
    device.throttle_increment()  # a token checked: not a change of who may do what
    device.delete()

    assert [
        e.action for e in AuditEvent.objects.filter(action__startswith="totp").order_by("id")
    ] == [
        "totp_device.added",
        "totp_device.confirmed",
        "totp_device.removed",
    ]
    confirmed = events("totp_device.confirmed")[0]
    assert confirmed.before["totp_device"]["confirmed"] is False
    assert confirmed.after["totp_device"] == {"user": "erin", "name": "phone", "confirmed": True}
    assert "key" not in str(confirmed.after)


def test_the_rules_hold_below_the_admin(roles):
    """Code acting for a Console admin (any door, not only the admin's form) is refused."""
    admin_user = member(CONSOLE_ADMIN, "admin-ann")
    other = UserFactory(username="bob")
    with acting_as(admin_user):
        myself = User.objects.get(pk=admin_user.pk)
        myself.is_superuser = True
        with pytest.raises(services.PermissionDenied, match="Nobody may change their own"):
            myself.save()
        # Each in a transaction of its own, as a request's would be: the refusal fails it.
        with (
            pytest.raises(services.PermissionDenied, match="Console admin group"),
            transaction.atomic(),
        ):
            Group.objects.get(name=CONSOLE_ADMIN).user_set.add(other)
        with (
            pytest.raises(services.PermissionDenied, match="Nobody may change their own"),
            transaction.atomic(),
        ):
            admin_user.groups.clear()
    admin_user.refresh_from_db()
    assert not admin_user.is_superuser
    assert not other.groups.exists()
    assert admin_user.groups.count() == 1


def test_permissions_given_to_a_user_and_a_group_are_recorded_with_before_and_after(roles):
    root = UserFactory(username="root", is_superuser=True)
    user = UserFactory(username="frank")
    group = Group.objects.create(name="Release managers")
    change_user = Permission.objects.get(codename="change_user")

    with acting_as(root):
        user.user_permissions.add(change_user)
        group.permissions.add(change_user)
        group.permissions.remove(change_user)

    (given,) = events("user.permissions_changed")
    assert (given.actor_name, given.door, given.object_id) == ("root", "admin", user.pk)
    assert (given.before, given.after) == (
        {"permissions": []},
        {"permissions": ["auth.change_user"]},
    )
    assert [(e.before, e.after) for e in events("group.permissions_changed")] == [
        ({"permissions": []}, {"permissions": ["auth.change_user"]}),
        ({"permissions": ["auth.change_user"]}, {"permissions": []}),
    ]
