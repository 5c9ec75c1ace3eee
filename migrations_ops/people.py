"""Who may do what: users, their superuser / staff / active flags, passwords, groups,
permissions and TOTP devices.

Every change is an audit event with before and after (never a password's hash: only that it
changed), whichever door made it: the admin, ``createsuperuser``, ``changepassword``, a shell.
Django's model signals see them all; they are connected when the app is ready
(``MigrationsOpsConfig.ready``). The actor is the request's user (``opsconsole.middleware``),
or, with no request, the host's operator.

Nobody escalates (``escalation``): nobody changes their own superuser flag, groups or
permissions; only a superuser grants or revokes superuser status or the Console admin group,
gives permissions (to a user or a group), or changes a superuser's account. The admin's forms
ask first, to refuse with a clear message (and record the refusal); the signals ask again
before anything is written, so that no other door passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save
from django_otp.plugins.otp_totp.models import TOTPDevice

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import Door
from migrations_ops.roles import CONSOLE_ADMIN
from opsconsole import middleware as request_context

User = get_user_model()

# The user fields whose changes are recorded (the password separately, as "changed").
USER_FIELDS = ("username", "email", "first_name", "last_name", "is_active", "is_staff")
ACCESS_FIELDS = ("is_superuser",)
TOTP_FIELDS = ("name", "confirmed")


@dataclass
class AccessChange:
    """What a change does to who may do what (the parts the rules look at)."""

    superuser: bool = False  # the superuser flag changes (or a superuser is created)
    groups: set[str] = field(default_factory=set)  # the groups joined or left, by name
    user_permissions: bool = False
    group_permissions: Group | None = None
    account: bool = False  # anything else of the user's account (password included)


def acting_user():
    """The authenticated user of the request being served, or None (a CLI, a shell, a task)."""
    return request_context.current().acting_user()


def acting_actor() -> Actor:
    context = request_context.current()
    user = context.acting_user()
    if user is not None:
        return Actor.for_user(user, context.door or Door.ADMIN)
    if context.door:  # a request nobody is logged in to (a login checking a TOTP token)
        return Actor(user=None, name="(not logged in)", door=context.door)
    return Actor.shell_operator()


def escalation(acting, subject, change: AccessChange) -> str | None:
    """Why ``acting`` (a user; None is the host's operator, who holds the keys already) may not
    make ``change`` to ``subject`` (a user, or None for a group's permissions); None if it may."""
    if acting is None:
        return None
    about_self = subject is not None and subject.pk is not None and subject.pk == acting.pk
    if about_self and (change.superuser or change.groups or change.user_permissions):
        return (
            "Nobody may change their own superuser status, groups or permissions: ask another "
            "superuser."
        )
    if acting.is_superuser:
        return None
    if change.superuser:
        return "Only a superuser may grant or revoke superuser status."
    if CONSOLE_ADMIN in change.groups:
        return f"Only a superuser may add people to the {CONSOLE_ADMIN} group or remove them."
    if change.user_permissions:
        return "Only a superuser may give a user permissions of their own."
    if change.group_permissions is not None:
        return (
            f"Only a superuser may change the permissions of the group {change.group_permissions}."
        )
    if subject is not None and not about_self and _stored_superuser(subject):
        return f"Only a superuser may change the account of {subject.get_username()}, a superuser."
    return None


def _stored_superuser(user) -> bool:
    if user.pk is None:
        return False
    return User._base_manager.filter(pk=user.pk, is_superuser=True).exists()


def refuse_escalation(subject, change: AccessChange) -> None:
    """The model-level check every door meets: PermissionDenied before anything is written."""
    refusal = escalation(acting_user(), subject, change)
    if refusal is not None:
        raise services.PermissionDenied(refusal)


def _record(action: str, subject, before: dict | None = None, after: dict | None = None, **details):
    services.record_audit_event(
        acting_actor(), action, subject=subject, before=before, after=after, details=details
    )


# --- users ------------------------------------------------------------------------------------
def _user_state(user) -> dict:
    return {name: getattr(user, name) for name in (*USER_FIELDS, *ACCESS_FIELDS)}


def _watched(update_fields, names) -> bool:
    return update_fields is None or bool(set(update_fields) & {*names, "password"})


def _user_pre_save(sender, instance, raw=False, update_fields=None, **kwargs):
    instance._access_before = None
    if raw or not _watched(update_fields, (*USER_FIELDS, *ACCESS_FIELDS)):
        return
    stored = None
    if instance.pk is not None:
        stored = User._base_manager.filter(pk=instance.pk).first()
    if stored is None:
        change = AccessChange(superuser=instance.is_superuser)
    else:
        before, after = _user_state(stored), _user_state(instance)
        change = AccessChange(
            superuser=before["is_superuser"] != after["is_superuser"],
            account=before != after or stored.password != instance.password,
        )
    refuse_escalation(instance if stored is not None else None, change)
    instance._access_before = (stored and _user_state(stored), stored and stored.password)


def _user_post_save(sender, instance, created, raw=False, update_fields=None, **kwargs):
    remembered = getattr(instance, "_access_before", None)
    instance._access_before = None
    if raw or remembered is None:
        return
    before, password = remembered
    after = _user_state(instance)
    if created or before is None:
        _record("user.created", instance, after=after, username=instance.get_username())
        return
    changed = [name for name in after if before[name] != after[name]]
    if changed:
        _record(
            "user.changed",
            instance,
            before={name: before[name] for name in changed},
            after={name: after[name] for name in changed},
            username=instance.get_username(),
        )
    if password != instance.password:
        _record("user.password_changed", instance, username=instance.get_username())


def _user_pre_delete(sender, instance, **kwargs):
    refuse_escalation(instance, AccessChange(account=True))
    instance._access_deleted = {
        **_user_state(instance),
        "groups": sorted(instance.groups.values_list("name", flat=True)),
    }


def _user_post_delete(sender, instance, **kwargs):
    _record(
        "user.deleted",
        instance,
        before=getattr(instance, "_access_deleted", _user_state(instance)),
        username=instance.get_username(),
    )


# --- memberships and permissions (many-to-many) ------------------------------------------------
@dataclass(frozen=True)
class Relation:
    """A many-to-many relation whose changes change who may do what."""

    owner: type  # the model holding the field: User or Group
    name: str  # "groups", "user_permissions", "permissions"
    action: str  # the audit event's action
    key: str  # the before/after key


def _names(relation: Relation, owner_pk) -> list[str]:
    rows = getattr(relation.owner._base_manager.get(pk=owner_pk), relation.name).all()
    if relation.name == "groups":
        return sorted(rows.values_list("name", flat=True))
    return sorted(
        f"{app}.{codename}"
        for app, codename in rows.values_list("content_type__app_label", "codename")
    )


def _affected(relation: Relation, instance, reverse: bool, pk_set) -> list:
    """The owners (users or groups) whose relation changes."""
    if not reverse:
        return [instance.pk]
    if pk_set is not None:
        return sorted(pk_set)
    owners = relation.owner._base_manager.filter(**{relation.name: instance})
    return list(owners.values_list("pk", flat=True))


def _change_of(relation: Relation, instance, reverse: bool, action: str, pk_set) -> AccessChange:
    if relation.name != "groups":
        if relation.owner is Group:
            group = instance if not reverse else Group(name="(several)")
            return AccessChange(group_permissions=group)
        return AccessChange(user_permissions=True)
    if reverse:
        groups = {instance.name}
    elif pk_set is None:  # clear: every group the user is in
        groups = set(instance.groups.values_list("name", flat=True))
    else:
        groups = set(Group.objects.filter(pk__in=pk_set).values_list("name", flat=True))
    return AccessChange(groups=groups)


def _m2m_changed(relation: Relation):
    def handler(sender, instance, action, reverse, model, pk_set, **kwargs):
        if action in ("pre_add", "pre_remove", "pre_clear"):
            owners = _affected(relation, instance, reverse, pk_set)
            change = _change_of(relation, instance, reverse, action, pk_set)
            for owner_pk in owners:
                subject = User._base_manager.get(pk=owner_pk) if relation.owner is User else None
                refuse_escalation(subject, change)
            instance._access_m2m = {pk: _names(relation, pk) for pk in owners}
        elif action in ("post_add", "post_remove", "post_clear"):
            remembered = getattr(instance, "_access_m2m", {}) or {}
            instance._access_m2m = None
            for owner_pk, before in remembered.items():
                after = _names(relation, owner_pk)
                if after == before:
                    continue
                owner = relation.owner._base_manager.get(pk=owner_pk)
                name = owner.get_username() if relation.owner is User else owner.name
                _record(
                    relation.action,
                    owner,
                    before={relation.key: before},
                    after={relation.key: after},
                    name=name,
                )

    return handler


RELATIONS = [
    Relation(User, "groups", "user.groups_changed", "groups"),
    Relation(User, "user_permissions", "user.permissions_changed", "permissions"),
    Relation(Group, "permissions", "group.permissions_changed", "permissions"),
]


# --- groups -----------------------------------------------------------------------------------
def _group_pre_save(sender, instance, raw=False, **kwargs):
    stored = Group.objects.filter(pk=instance.pk).first() if instance.pk else None
    instance._access_before = stored.name if stored else None


def _group_post_save(sender, instance, created, raw=False, **kwargs):
    if raw:
        return
    before = getattr(instance, "_access_before", None)
    if created:
        _record("group.created", instance, after={"name": instance.name}, name=instance.name)
    elif before is not None and before != instance.name:
        _record("group.renamed", instance, before={"name": before}, after={"name": instance.name})


def _group_pre_delete(sender, instance, **kwargs):
    refuse_escalation(None, AccessChange(groups={instance.name}))
    instance._access_deleted = {
        "name": instance.name,
        "members": sorted(instance.user_set.values_list("username", flat=True)),
        "permissions": _names(RELATIONS[2], instance.pk),
    }


def _group_post_delete(sender, instance, **kwargs):
    before = getattr(instance, "_access_deleted", {"name": instance.name})
    _record("group.deleted", instance, before=before, name=instance.name)


# --- TOTP devices -----------------------------------------------------------------------------
def _device_state(device) -> dict:
    return {"user": device.user.get_username(), **{n: getattr(device, n) for n in TOTP_FIELDS}}


def _device_pre_save(sender, instance, raw=False, update_fields=None, **kwargs):
    instance._access_before = None
    # Each token checked saves the device (its drift and throttling): nothing to record then.
    if raw or (update_fields is not None and not set(update_fields) & {*TOTP_FIELDS, "user"}):
        instance._access_skip = True
        return
    instance._access_skip = False
    stored = TOTPDevice.objects.filter(pk=instance.pk).first() if instance.pk else None
    instance._access_before = _device_state(stored) if stored else None


def _device_post_save(sender, instance, created, raw=False, **kwargs):
    if raw or getattr(instance, "_access_skip", False):
        return
    before, after = instance._access_before, _device_state(instance)
    user = instance.user
    if created or before is None:
        _record("totp_device.added", user, after={"totp_device": after}, device_id=instance.pk)
    elif before != after:
        action = (
            "totp_device.confirmed"
            if after["confirmed"] and not before["confirmed"]
            else "totp_device.changed"
        )
        _record(
            action,
            user,
            before={"totp_device": before},
            after={"totp_device": after},
            device_id=instance.pk,
        )


def _device_post_delete(sender, instance, **kwargs):
    user = User._base_manager.filter(pk=instance.user_id).first()
    state = {
        "user": user.get_username() if user else "",
        **{n: getattr(instance, n) for n in TOTP_FIELDS},
    }
    _record("totp_device.removed", user, before={"totp_device": state}, device_id=instance.pk)


def connect() -> None:
    """Called once, by the app's ready()."""
    pre_save.connect(_user_pre_save, sender=User, dispatch_uid="people_user_pre_save")
    post_save.connect(_user_post_save, sender=User, dispatch_uid="people_user_post_save")
    pre_delete.connect(_user_pre_delete, sender=User, dispatch_uid="people_user_pre_delete")
    post_delete.connect(_user_post_delete, sender=User, dispatch_uid="people_user_post_delete")
    for relation in RELATIONS:
        through = getattr(relation.owner, relation.name).through
        m2m_changed.connect(
            _m2m_changed(relation),
            sender=through,
            weak=False,
            dispatch_uid=f"people_{relation.action}",
        )
    pre_save.connect(_group_pre_save, sender=Group, dispatch_uid="people_group_pre_save")
    post_save.connect(_group_post_save, sender=Group, dispatch_uid="people_group_post_save")
    pre_delete.connect(_group_pre_delete, sender=Group, dispatch_uid="people_group_pre_delete")
    post_delete.connect(_group_post_delete, sender=Group, dispatch_uid="people_group_post_delete")
    pre_save.connect(_device_pre_save, sender=TOTPDevice, dispatch_uid="people_totp_pre_save")
    post_save.connect(_device_post_save, sender=TOTPDevice, dispatch_uid="people_totp_post_save")
    post_delete.connect(
        _device_post_delete, sender=TOTPDevice, dispatch_uid="people_totp_post_delete"
    )
