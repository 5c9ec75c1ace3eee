"""Users and groups in the admin: Django's, refusing with a message a change that escalates.

Django's admin of users and groups, with the rules of ``migrations_ops.people`` asked
before a change is saved, so a refused one gets a clear message (and is on the audit trail)
instead of an error. The model signals ask again, for every other door."""

from __future__ import annotations

from django import forms
from django.contrib import admin
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied

from migrations_ops import people
from migrations_ops.actors import Actor
from migrations_ops.models import Door
from migrations_ops.refusals import record_refusal
from migrations_ops.roles import CONSOLE_ADMIN
from migrations_ops.services import PermissionDenied as Refused

User = people.User


def _access_change_of_user(form) -> people.AccessChange:
    """What the posted user form would change of who may do what."""
    data = form.cleaned_data
    stored = User._base_manager.filter(pk=form.instance.pk).first() if form.instance.pk else None
    change = people.AccessChange(account=stored is not None and form.has_changed())
    if "is_superuser" in data:
        change.superuser = bool(data["is_superuser"]) != bool(stored and stored.is_superuser)
    if "groups" in data:
        now = set(stored.groups.values_list("name", flat=True)) if stored else set()
        change.groups = now ^ {group.name for group in data["groups"]}
    if "user_permissions" in data:
        now = set(stored.user_permissions.values_list("pk", flat=True)) if stored else set()
        change.user_permissions = now != {p.pk for p in data["user_permissions"]}
    return change


def _checked(form_class, request, change_of, request_name: str):
    """``form_class`` whose clean() refuses what ``request.user`` may not change, recording
    the refusal (the admin's form view commits it with the refused page)."""

    class CheckedForm(form_class):
        def clean(self):
            cleaned = super().clean()
            # A group's change is about no user; a new user's, about nobody yet.
            subject = (
                self.instance if self.instance.pk and isinstance(self.instance, User) else None
            )
            refusal = people.escalation(request.user, subject, change_of(self))
            if refusal is not None:
                record_refusal(
                    Actor.for_user(request.user, Door.ADMIN),
                    request_name,
                    Refused(refusal),
                    subject=self.instance if self.instance.pk else None,
                    details={"posted": _posted(self)},
                )
                raise forms.ValidationError(refusal, code="escalation")
            return cleaned

    CheckedForm.__name__ = form_class.__name__
    return CheckedForm


def _posted(form) -> dict:
    """What the refused form asked for, by name (no password)."""
    shown = {}
    for name in ("username", "is_superuser", "is_staff", "is_active", "name"):
        if name in form.cleaned_data:
            shown[name] = form.cleaned_data[name]
    if "groups" in form.cleaned_data:
        shown["groups"] = sorted(group.name for group in form.cleaned_data["groups"])
    for name in ("user_permissions", "permissions"):
        if name in form.cleaned_data:
            shown[name] = sorted(p.codename for p in form.cleaned_data[name])
    return shown


def _access_change_of_group(form) -> people.AccessChange:
    stored = Group.objects.filter(pk=form.instance.pk).first() if form.instance.pk else None
    change = people.AccessChange()
    posted = form.cleaned_data.get("permissions")
    if posted is not None:
        now = set(stored.permissions.values_list("pk", flat=True)) if stored else set()
        if now != {p.pk for p in posted}:
            change.group_permissions = stored or Group(name=form.cleaned_data.get("name", ""))
    if stored is not None and stored.name == CONSOLE_ADMIN and form.has_changed():
        change.groups = {CONSOLE_ADMIN}
    return change


admin.site.unregister(User)
admin.site.unregister(Group)


@admin.register(User)
class ConsoleUserAdmin(UserAdmin):
    """Django's user admin; changes that would escalate are refused with a message."""

    def get_form(self, request, obj=None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        return _checked(form, request, _access_change_of_user, "user.change")

    def has_delete_permission(self, request, obj=None):
        allowed = super().has_delete_permission(request, obj)
        if obj is not None and obj.is_superuser and not request.user.is_superuser:
            return False
        return allowed

    def user_change_password(self, request, id, form_url=""):
        user = self.get_object(request, id)
        if user is not None:
            refusal = people.escalation(request.user, user, people.AccessChange(account=True))
            if refusal is not None:
                raise PermissionDenied(refusal)
        return super().user_change_password(request, id, form_url)


@admin.register(Group)
class ConsoleGroupAdmin(GroupAdmin):
    """Django's group admin; only a superuser changes permissions or the Console admin group."""

    def get_form(self, request, obj=None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        return _checked(form, request, _access_change_of_group, "group.change")

    def has_delete_permission(self, request, obj=None):
        allowed = super().has_delete_permission(request, obj)
        if obj is not None and obj.name == CONSOLE_ADMIN and not request.user.is_superuser:
            return False
        return allowed
