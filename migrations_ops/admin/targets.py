"""Targets in the admin: ``TargetAdmin`` whole, every action on a target with its confirmation
page, and the Flags page; each write handed to ``services``.

The actions, and where each lives:
- emergency disable, force-unlock, refresh status, verify: methods below;
- dry-run / apply / roll back / clean up / fix the books: one confirmation page
  (``operate_view`` below) driven by the table ``target_operations.TARGET_ACTIONS``, whose
  form, preview and hand-off to the services are in ``target_operations.py``."""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from migrations_ops import selectors, services
from migrations_ops.actors import Actor
from migrations_ops.admin.history import AuditHistoryMixin
from migrations_ops.admin.target_operations import (
    ACTIONS_BY_SLUG,
    TARGET_ACTIONS,
    TargetOperationForm,
    error_with_link,
    make_action,
    preview,
    request_operation,
    warn_if_broker_down,
)
from migrations_ops.forms import (
    EmergencyDisableForm,
    FlagsForm,
    ForceUnlockForm,
    ReenableStepForm,
    TargetForm,
)
from migrations_ops.models import TARGET_SETTINGS, Door, FlagStage, LockState, Target
from migrations_ops.refusals import invalid_form_recorded, refusal_recorded

LOCK_COLOURS = {
    LockState.FREE: "#2e7d32",
    LockState.HELD: "#b26a00",
    LockState.STALE: "#c62828",
    LockState.UNKNOWN: "#666",
}


def flags_url(target: Target) -> str:
    return reverse("admin:migrations_ops_target_flags", args=[target.pk])


@admin.register(Target)
class TargetAdmin(AuditHistoryMixin, admin.ModelAdmin):
    form = TargetForm
    list_display = ["name", "environment", "convention", "lock_column", "observed_column"]
    list_filter = ["environment", "convention"]
    search_fields = ["name"]
    list_select_related = ["lock_observation"]
    readonly_fields = ["masked_url", "lock_column", "flags_column", "created_at", "updated_at"]
    actions = [
        "emergency_disable",
        "force_unlock",
        "refresh_status",
        "verify_targets",
        # One per row of TARGET_ACTIONS: each opens operate_view for the selected target.
        *(make_action(action) for action in TARGET_ACTIONS),
    ]

    # --- the form and the columns --------------------------------------------------------------
    def get_fields(self, request, obj=None):
        fields = list(TARGET_SETTINGS)
        if obj is not None:
            # The URL is a write-only input: a user who may not change the target would get
            # it rendered read-only, so they see the masked row alone.
            if not self.has_change_permission(request, obj):
                fields.remove("connection_url")
            fields[3:3] = ["masked_url"]
            # The flags change only on their own page (the services keep their history).
            fields += ["flags_column", "lock_column", "created_at", "updated_at"]
        return fields

    @admin.display(description="Connection (masked)")
    def masked_url(self, obj):
        return obj.masked_url

    @admin.display(description="Lock")
    def lock_column(self, obj):
        report = selectors.lock_report(obj)
        return format_html(
            '<span style="color:{};font-weight:bold">{}</span>',
            LOCK_COLOURS[report["state"]],
            selectors.describe_lock(report),
        )

    @admin.display(description="Lock observed")
    def observed_column(self, obj):
        observation = selectors.observation_of(obj)
        if observation is None or observation.observed_at is None:
            return "never"
        seconds = (timezone.now() - observation.observed_at).total_seconds()
        return f"{selectors.humanize_seconds(seconds)} ago"

    @admin.display(description="Runtime flags")
    def flags_column(self, obj):
        return format_html(
            "{} &middot; stage: {} &middot; <a href='{}'>Flags page (change, history, "
            "re-enable)</a>",
            selectors.describe_flags(selectors.flags_of(obj)),
            obj.get_flag_stage_display(),
            flags_url(obj),
        )

    def save_model(self, request, obj, form, change):
        services.save_target(
            actor=Actor.for_user(request.user, Door.ADMIN),
            target=obj,
            changed_fields=form.changed_data,
        )

    # --- who may take which action -------------------------------------------------------------
    def has_change_flags_permission(self, request):
        return request.user.has_perm(services.CHANGE_FLAGS_PERMISSION)

    def has_force_unlock_permission(self, request):
        return request.user.has_perm(services.FORCE_UNLOCK_PERMISSION)

    def has_verify_permission(self, request):
        return request.user.has_perm("migrations_ops.verify_target")

    def has_run_migrations_permission(self, request):
        return request.user.has_perm("migrations_ops.run_migrations")

    def has_dry_run_migrations_permission(self, request):
        return request.user.has_perm("migrations_ops.dry_run_migrations")

    def has_cleanup_target_permission(self, request):
        return request.user.has_perm("migrations_ops.cleanup_target")

    def has_fix_books_permission(self, request):
        return request.user.has_perm("migrations_ops.fix_books")

    # --- the actions: each opens its confirmation page, but those that change nothing ----------
    @admin.action(description="Emergency disable auto-migration", permissions=["change_flags"])
    def emergency_disable(self, request, queryset):
        ids = ",".join(str(pk) for pk in queryset.order_by("pk").values_list("pk", flat=True))
        return redirect(f"{reverse('admin:migrations_ops_target_emergency_disable')}?ids={ids}")

    @admin.action(description="Force-release migration lock", permissions=["force_unlock"])
    def force_unlock(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(
                request, "Select exactly one target to release its lock.", messages.ERROR
            )
            return None
        return redirect("admin:migrations_ops_target_force_unlock", queryset.get().pk)

    # Reading a target is left to those who may verify it: an auditor's pages never reach out.
    @admin.action(description="Refresh lock status (read the targets now)", permissions=["verify"])
    def refresh_status(self, request, queryset):
        for target in queryset:
            status = services.read_target_status(target, include_applied=False)
            if status.error:
                self.message_user(request, f"{target.name}: {status.error}", messages.ERROR)
        self.message_user(request, f"Read {queryset.count()} target(s).", messages.INFO)

    @admin.action(description="Verify (books against scripts)", permissions=["verify"])
    def verify_targets(self, request, queryset):
        """Verify needs no confirmation: it changes nothing."""
        actor = Actor.for_user(request.user, Door.ADMIN)
        for target in queryset:
            try:
                operation = services.request_verify(actor=actor, target=target)
            except services.ServiceError as error:
                refusal_recorded(request, "verify", error, target=target)
                self.message_user(request, f"{target.name}: {error}", messages.ERROR)
                continue
            operation.refresh_from_db()
            problems = operation.result.get("problems")
            outcome = f"{len(problems)} problem(s)" if problems is not None else operation.status
            self.message_user(
                request,
                f"{target.name}: verify #{operation.pk}: {outcome}",
                messages.WARNING if problems else messages.INFO,
            )

    # --- the pages -----------------------------------------------------------------------------
    def get_urls(self):
        return [
            path(
                "<int:target_id>/force-unlock/",
                self.admin_site.admin_view(self.force_unlock_view),
                name="migrations_ops_target_force_unlock",
            ),
            path(
                "<int:target_id>/operate/<slug:slug>/",
                self.admin_site.admin_view(self.operate_view),
                name="migrations_ops_target_operate",
            ),
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
            *super().get_urls(),
        ]

    def force_unlock_view(self, request, target_id: int):
        if not self.has_force_unlock_permission(request):
            raise PermissionDenied
        target = get_object_or_404(Target, pk=target_id)
        form = ForceUnlockForm(request.POST if request.method == "POST" else None, target=target)
        if request.method == "POST" and form.is_valid():
            try:
                operation = services.request_force_unlock(
                    actor=Actor.for_user(request.user, Door.ADMIN),
                    target=target,
                    reason=form.cleaned_data["reason"],
                    release_fresh=form.cleaned_data["release_fresh"],
                    confirm_name=form.cleaned_data.get("confirm_name"),
                    incident=form.cleaned_data["incident"],
                )
            except services.ServiceError as error:
                refusal_recorded(request, "force_unlock", error, target=target)
                form.add_error(None, error_with_link(error))
            else:
                self.message_user(
                    request,
                    f"Operation #{operation.pk} requested: release the lock of {target.name}.",
                    messages.SUCCESS,
                )
                warn_if_broker_down(self, request, operation)
                return redirect("admin:migrations_ops_operation_change", operation.pk)
        elif request.method == "POST":
            invalid_form_recorded(request, "force_unlock", form, target=target)
        status = services.read_target_status(target, include_applied=False)
        report = selectors.lock_report(target)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Force-release the migration lock of {target.name}",
            "target": target,
            "form": form,
            "status_error": status.error,
            "lock": report,
            "lock_text": selectors.describe_lock(report),
            "lock_colour": LOCK_COLOURS[report["state"]],
        }
        return TemplateResponse(request, "admin/migrations_ops/target/force_unlock.html", context)

    def operate_view(self, request, target_id: int, slug: str):
        """The confirmation page of every action in TARGET_ACTIONS: what will happen, then the
        request to the services."""
        action = ACTIONS_BY_SLUG.get(slug)
        if action is None:
            raise PermissionDenied
        if not request.user.has_perm(f"migrations_ops.{action.permission}"):
            raise PermissionDenied
        target = get_object_or_404(Target, pk=target_id)
        shown = preview(target, action)
        form = TargetOperationForm(
            request.POST if request.method == "POST" else None,
            target=target,
            action=action,
            versions=shown["versions"],
        )
        if request.method == "POST" and form.is_valid():
            try:
                operation = request_operation(
                    Actor.for_user(request.user, Door.ADMIN), target, action, form.cleaned_data
                )
            except services.ServiceError as error:
                refusal_recorded(request, action.slug, error, target=target)
                form.add_error(None, error_with_link(error))
            else:
                self.message_user(
                    request,
                    f"Operation #{operation.pk} requested: {action.label.lower()} on "
                    f"{target.name} ({operation.get_status_display().lower()}).",
                    messages.SUCCESS,
                )
                warn_if_broker_down(self, request, operation)
                return redirect("admin:migrations_ops_operation_change", operation.pk)
        elif request.method == "POST":
            invalid_form_recorded(request, action.slug, form, target=target)
        report = selectors.lock_report(target)
        context = {
            **self.admin_site.each_context(request),
            **shown,
            "opts": self.model._meta,
            "title": f"{action.label}: {target.name}",
            "target": target,
            "action": action,
            "form": form,
            "lock_text": selectors.describe_lock(report),
        }
        return TemplateResponse(request, "admin/migrations_ops/target/operate.html", context)

    def flags_view(self, request, target_id: int):
        """The Flags page: the flags, their history and the guided re-enable."""
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
