"""The users' and groups' admin: a Console admin cannot escalate (their own superuser flag,
groups, permissions; the Console admin group; superusers' accounts); a superuser can; every
change and every refusal is on the audit trail with before and after."""

import pytest
from django.contrib.auth.models import Group, Permission
from django.urls import reverse

from migrations_ops.models import AuditEvent
from migrations_ops.roles import AUDITOR, CONSOLE_ADMIN, INCIDENT_COMMANDER, ON_CALL
from tests.factories import UserFactory, member

pytestmark = pytest.mark.django_db

ALL_GROUPS = [CONSOLE_ADMIN, ON_CALL, INCIDENT_COMMANDER, AUDITOR]


def change_page(user) -> str:
    return reverse("admin:auth_user_change", args=[user.pk])


def posted_user(user, **changes) -> dict:
    """The change form as the admin shows it for ``user``, with ``changes``."""
    data = {
        "username": user.username,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "email": user.email,
        "is_active": "on" if user.is_active else "",
        "is_staff": "on" if user.is_staff else "",
        "is_superuser": "on" if user.is_superuser else "",
        "groups": [str(pk) for pk in user.groups.values_list("pk", flat=True)],
        "user_permissions": [str(pk) for pk in user.user_permissions.values_list("pk", flat=True)],
        "last_login_0": "",
        "last_login_1": "",
        "date_joined_0": user.date_joined.strftime("%Y-%m-%d"),
        "date_joined_1": user.date_joined.strftime("%H:%M:%S"),
    }
    data.update(changes)
    return {name: value for name, value in data.items() if value != ""}


def group_pks(*names) -> list[str]:
    return [str(Group.objects.get(name=name).pk) for name in names]


@pytest.fixture
def console_admin(roles, client):
    user = member(CONSOLE_ADMIN, "admin-ann")
    client.force_login(user)
    return user


@pytest.fixture
def superuser(roles, client):
    user = UserFactory(username="root-rita", is_superuser=True)
    client.force_login(user)
    return user


def refusals() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action="refused.user.change").order_by("id"))


def test_a_console_admin_cannot_make_themselves_superuser(console_admin, client):
    response = client.post(
        change_page(console_admin), posted_user(console_admin, is_superuser="on")
    )

    assert response.status_code == 200
    assert "Nobody may change their own superuser status, groups or permissions" in (
        response.content.decode()
    )
    console_admin.refresh_from_db()
    assert not console_admin.is_superuser
    (refusal,) = refusals()
    assert refusal.actor_name == "admin-ann"
    assert refusal.door == "admin"
    assert refusal.object_model == "auth.user"
    assert refusal.object_id == console_admin.pk
    assert refusal.details["message"].startswith("Nobody may change their own superuser status")
    assert refusal.details["posted"]["is_superuser"] is True
    assert not AuditEvent.objects.filter(action="user.changed", actor_name="admin-ann")


def test_a_console_admin_cannot_join_every_group(console_admin, client):
    response = client.post(
        change_page(console_admin), posted_user(console_admin, groups=group_pks(*ALL_GROUPS))
    )

    assert "Nobody may change their own superuser status, groups or permissions" in (
        response.content.decode()
    )
    assert list(console_admin.groups.values_list("name", flat=True)) == [CONSOLE_ADMIN]
    assert len(refusals()) == 1
    assert not AuditEvent.objects.filter(action="user.groups_changed", actor_name="admin-ann")


def test_a_console_admin_cannot_grant_console_admin_or_superuser_to_another(console_admin, client):
    other = UserFactory(username="bob")

    to_admin = client.post(change_page(other), posted_user(other, groups=group_pks(CONSOLE_ADMIN)))
    to_superuser = client.post(change_page(other), posted_user(other, is_superuser="on"))
    permission = Permission.objects.get(codename="change_user")
    own_permission = client.post(
        change_page(other), posted_user(other, user_permissions=[str(permission.pk)])
    )

    assert "Only a superuser may add people to the Console admin group" in to_admin.content.decode()
    assert "Only a superuser may grant or revoke superuser status." in to_superuser.content.decode()
    assert "Only a superuser may give a user permissions of their own." in (
        own_permission.content.decode()
    )
    other.refresh_from_db()
    assert (other.is_superuser, list(other.groups.all()), list(other.user_permissions.all())) == (
        False,
        [],
        [],
    )
    assert len(refusals()) == 3


def test_a_console_admin_may_still_put_someone_on_call(console_admin, client):
    other = UserFactory(username="bob")

    response = client.post(change_page(other), posted_user(other, groups=group_pks(ON_CALL)))

    assert response.status_code == 302
    assert list(other.groups.values_list("name", flat=True)) == [ON_CALL]
    event = AuditEvent.objects.get(action="user.groups_changed", actor_name="admin-ann")
    assert (event.actor_name, event.before, event.after) == (
        "admin-ann",
        {"groups": []},
        {"groups": [ON_CALL]},
    )


def test_a_console_admin_cannot_change_a_superusers_password(console_admin, client):
    root = UserFactory(username="root", is_superuser=True)

    response = client.post(
        reverse("admin:auth_user_password_change", args=[root.pk]),
        {"password1": "a new password 123", "password2": "a new password 123"},
    )

    assert response.status_code == 403
    root.refresh_from_db()
    assert root.check_password("correct horse battery staple")
    refusal = AuditEvent.objects.get(action="refused.http_403")
    assert refusal.actor_name == "admin-ann"


def test_a_console_admin_cannot_give_a_group_permissions(console_admin, client):
    group = Group.objects.get(name=AUDITOR)
    permission = Permission.objects.get(codename="change_user")
    before = set(group.permissions.all())

    response = client.post(
        reverse("admin:auth_group_change", args=[group.pk]),
        {"name": group.name, "permissions": [str(p.pk) for p in [*before, permission]]},
    )

    assert "Only a superuser may change the permissions of the group Auditor." in (
        response.content.decode()
    )
    assert set(group.permissions.all()) == before
    assert AuditEvent.objects.filter(action="refused.group.change").count() == 1


def test_a_superuser_grants_superuser_and_console_admin_with_before_and_after(superuser, client):
    other = UserFactory(username="bob")

    response = client.post(
        change_page(other),
        posted_user(other, is_superuser="on", groups=group_pks(CONSOLE_ADMIN)),
        REMOTE_ADDR="203.0.113.7",
    )

    assert response.status_code == 302
    other.refresh_from_db()
    assert other.is_superuser
    changed = AuditEvent.objects.get(action="user.changed", actor_name="root-rita")
    assert (changed.actor_name, changed.door, changed.ip) == ("root-rita", "admin", "203.0.113.7")
    assert (changed.before, changed.after) == ({"is_superuser": False}, {"is_superuser": True})
    assert (changed.object_model, changed.object_id) == ("auth.user", other.pk)
    groups = AuditEvent.objects.get(action="user.groups_changed", actor_name="root-rita")
    assert (groups.before, groups.after) == ({"groups": []}, {"groups": [CONSOLE_ADMIN]})


def test_a_superuser_cannot_change_their_own_superuser_flag(superuser, client):
    response = client.post(change_page(superuser), posted_user(superuser, is_superuser=""))

    assert "Nobody may change their own superuser status" in response.content.decode()
    superuser.refresh_from_db()
    assert superuser.is_superuser
