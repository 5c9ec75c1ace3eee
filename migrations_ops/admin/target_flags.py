"""The runtime flags in the admin: a target's Flags page (the flags, their history and the
guided re-enable) and the emergency disable of selected targets, all through ``services``."""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from migrations_ops import selectors, services
from migrations_ops.actors import Actor
from migrations_ops.forms import EmergencyDisableForm, FlagsForm, ReenableStepForm
from migrations_ops.models import Door, FlagStage, Target
from migrations_ops.refusals import invalid_form_recorded, refusal_recorded


def flags_url(target: Target) -> str:
    return reverse("admin:migrations_ops_target_flags", args=[target.pk])


class TargetFlagsMixin:
    """For TargetAdmin: the Flags page, the emergency-disable action and its confirmation."""

    def has_change_flags_permission(self, request):
        return request.user.has_perm(services.CHANGE_FLAGS_PERMISSION)

    @admin.action(description="Emergency disable auto-migration", permissions=["change_flags"])
    def emergency_disable(self, request, queryset):
        ids = ",".join(str(pk) for pk in queryset.order_by("pk").values_list("pk", flat=True))
        return redirect(f"{reverse('admin:migrations_ops_target_emergency_disable')}?ids={ids}")

    @admin.display(description="Runtime flags")
    def flags_column(self, obj):
        return format_html(
            "{} &middot; stage: {} &middot; <a href='{}'>Flags page (change, history, "
            "re-enable)</a>",
            selectors.describe_flags(selectors.flags_of(obj)),
            obj.get_flag_stage_display(),
            flags_url(obj),
        )

    def get_flag_urls(self):
        return [
            path(
                "<int:target_id>/flags/",
                self.admin_site.admin_view(self.flags_view),
                name="migrations_ops_target_flags",
            ),
            path(
                "emergency-disable/",
                self.admin_site.admin_view(self.emergency_disable_view),
                name="migrations_ops_target_emergency_disable",
            ),
        ]

    # --- the Flags page ------------------------------------------------------------------------
    def flags_view(self, request, target_id: int):
        if not self.has_view_permission(request):
            raise PermissionDenied
        target = get_object_or_404(Target, pk=target_id)
        may_change = self.has_change_flags_permission(request)
        posted = request.POST if request.method == "POST" else None
        if posted is not None and not may_change:
            raise PermissionDenied
        which = posted.get("form") if posted is not None else None
        flags_form = FlagsForm(posted if which == "flags" else None, target=target)
        step_form = ReenableStepForm(posted if which == "reenable" else None)
        actor = Actor.for_user(request.user, Door.ADMIN)
        if which == "flags" and flags_form.is_valid():
            try:
                change = services.change_flags(
                    actor=actor,
                    target=target,
                    changes=flags_form.changes(),
                    reason=flags_form.cleaned_data["reason"],
                )
            except services.ServiceError as error:
                refusal_recorded(request, "change_flags", error, target=target)
                self.message_user(request, str(error), messages.ERROR)
            else:
                self.message_user(
                    request,
                    f"Flags of {target.name} changed: {selectors.describe_flag_change(change)}.",
                    messages.SUCCESS,
                )
                return redirect(flags_url(target))
        elif which == "reenable" and step_form.is_valid():
            step = step_form.cleaned_data["step"]
            try:
                services.reenable_step(
                    actor=actor, target=target, step=step, reason=step_form.cleaned_data["reason"]
                )
            except services.ServiceError as error:
                refusal_recorded(request, "reenable_step", error, target=target)
                self.message_user(request, str(error), messages.ERROR)
            else:
                self.message_user(
                    request,
                    f"Re-enable step {step} taken on {target.name}: "
                    f"{selectors.describe_flags(selectors.REENABLE_STEPS[step].sets)}.",
                    messages.SUCCESS,
                )
                return redirect(flags_url(target))
        elif which in ("flags", "reenable"):
            posted_form = flags_form if which == "flags" else step_form
            what = "change_flags" if which == "flags" else "reenable_step"
            invalid_form_recorded(request, what, posted_form, target=target)
        next_step = selectors.next_reenable_step(target)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Runtime flags of {target.name}",
            "target": target,
            "flags": selectors.flags_of(target),
            "stage": FlagStage(target.flag_stage).label,
            "may_change": may_change,
            "form": flags_form,
            "step_form": step_form,
            "next_step": selectors.REENABLE_STEPS.get(next_step),
            "progress": selectors.reenable_progress(target),
            "history": [
                (change, selectors.describe_flag_change(change))
                for change in selectors.flag_history(target)[:200]
            ],
            "disable_url": (
                f"{reverse('admin:migrations_ops_target_emergency_disable')}?ids={target.pk}"
            ),
        }
        return TemplateResponse(request, "admin/migrations_ops/target/flags.html", context)

    # --- emergency disable ---------------------------------------------------------------------
    def emergency_disable_view(self, request):
        """The selected targets (``?ids=1,2``) or every one (``?all=1``), a reason, and for
        production targets the typed confirmation; then ``services.emergency_disable``."""
        if not self.has_change_flags_permission(request):
            raise PermissionDenied
        everything = request.GET.get("all") == "1"
        if everything:
            targets = list(Target.objects.order_by("name"))
        else:
            ids = [int(pk) for pk in request.GET.get("ids", "").split(",") if pk.isdigit()]
            targets = list(Target.objects.filter(pk__in=ids).order_by("name"))
        changelist = reverse("admin:migrations_ops_target_changelist")
        if not targets:
            self.message_user(request, "No target to disable.", messages.ERROR)
            return redirect(changelist)
        production = [target.name for target in targets if target.is_production]
        form = EmergencyDisableForm(
            request.POST if request.method == "POST" else None, production=production
        )
        if request.method == "POST" and form.is_valid():
            try:
                changes = services.emergency_disable(
                    actor=Actor.for_user(request.user, Door.ADMIN),
                    targets=targets,
                    reason=form.cleaned_data["reason"],
                )
            except services.ServiceError as error:
                refusal_recorded(request, "emergency_disable", error)
                self.message_user(request, str(error), messages.ERROR)
            else:
                names = ", ".join(change.target.name for change in changes)
                self.message_user(
                    request,
                    f"Auto-migration disabled on {len(changes)} target(s): {names} "
                    f"({selectors.describe_flags(selectors.QUICK_DISABLE)}).",
                    messages.SUCCESS,
                )
                return redirect(changelist)
        elif request.method == "POST":
            invalid_form_recorded(request, "emergency_disable", form)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Emergency disable auto-migration",
            "targets": [(target, selectors.flags_of(target)) for target in targets],
            "everything": everything,
            "flag_names": list(selectors.flags_of(targets[0])),
            "form": form,
        }
        return TemplateResponse(
            request, "admin/migrations_ops/target/emergency_disable.html", context
        )
