"""The operations a target's confirmation page requests: the table of actions, its form, the
preview of exactly what will happen, and the hand-off to the services (the page is
``TargetAdmin.operate_view``, in targets.py)."""

from __future__ import annotations

from dataclasses import dataclass

from django import forms
from django.contrib import admin, messages
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.html import format_html

from migrations_ops import engine, selectors, services
from migrations_ops.actors import Actor
from migrations_ops.forms import add_incident_field
from migrations_ops.models import OperationKind, Target


@dataclass(frozen=True)
class TargetAction:
    slug: str
    label: str
    permission: str  # codename in migrations_ops
    kind: str  # apply | rollback | cleanup | mark
    dry_run: bool = False


TARGET_ACTIONS = [
    TargetAction(
        "dry-run-apply", "Dry-run pending migrations", "dry_run_migrations", "apply", True
    ),
    TargetAction("apply", "Apply pending migrations", "run_migrations", "apply"),
    TargetAction("dry-run-rollback", "Dry-run a rollback", "dry_run_migrations", "rollback", True),
    TargetAction("rollback", "Roll back a migration", "run_migrations", "rollback"),
    TargetAction("cleanup", "Clean up the lock table", "cleanup_target", "cleanup"),
    TargetAction("fix-books", "Fix the books (mark applied / rolled back)", "fix_books", "mark"),
]
ACTIONS_BY_SLUG = {action.slug: action for action in TARGET_ACTIONS}


class TargetOperationForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
        help_text="Recorded on the operation and the audit trail.",
    )
    confirm_name = forms.CharField(
        label="Type the target's name to confirm",
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
    )

    def __init__(self, *args, target: Target, action: TargetAction, versions: list[str], **kw):
        super().__init__(*args, **kw)
        if action.dry_run:
            self.fields["reason"].required = False
            self.fields["reason"].help_text = "Optional for a dry run: it changes nothing."
        if action.dry_run or not target.is_production:
            del self.fields["confirm_name"]
        choices = [(version, version) for version in versions]
        if action.kind == "apply":
            self.fields["to_version"] = forms.ChoiceField(
                required=False,
                choices=[("", "every pending migration"), *choices],
                label="Up to version",
            )
        if action.kind == "rollback":
            self.fields["version"] = forms.ChoiceField(
                choices=choices, label="Version", help_text="The latest applied is first."
            )
            self.fields["out_of_order"] = forms.BooleanField(
                required=False,
                label="Out of order",
                help_text="Needed to roll back a migration that is not the latest applied.",
            )
        if action.kind in {"apply", "rollback"}:
            self.fields["non_transactional"] = forms.BooleanField(
                required=False,
                label="Allow running outside a transaction",
                help_text="Only for migrations that cannot run in one (CREATE INDEX "
                "CONCURRENTLY…): a failure half-way cannot be rolled back.",
            )
        if action.kind == "mark":
            self.fields["version"] = forms.ChoiceField(choices=choices, label="Version")
            self.fields["direction"] = forms.ChoiceField(
                choices=[("applied", "Mark applied"), ("rolled_back", "Mark rolled back")],
                widget=forms.RadioSelect,
                help_text="Changes only the books: no SQL runs.",
            )
        add_incident_field(self, target)


def warn_if_broker_down(model_admin, request, operation) -> None:
    operation.refresh_from_db()
    warning = selectors.broker_down_warning(operation)
    if warning:
        model_admin.message_user(request, warning, messages.WARNING)


def error_with_link(error: services.ServiceError):
    """A refusal as the page shows it: an operation in the way is a link to it."""
    if isinstance(error, services.OperationInProgress):
        url = reverse("admin:migrations_ops_operation_change", args=[error.operation_id])
        return format_html('{} (<a href="{}">open it</a>)', str(error), url)
    return str(error)


def request_operation(actor: Actor, target: Target, action: TargetAction, data: dict):
    """Hand the confirmed form to the service that owns the operation."""
    common = {
        "actor": actor,
        "target": target,
        "reason": data.get("reason", ""),
        "incident": data.get("incident"),
    }
    confirm = data.get("confirm_name")
    if action.kind == "apply":
        return services.request_apply(
            **common,
            to_version=data.get("to_version") or None,
            dry_run=action.dry_run,
            non_transactional=data.get("non_transactional", False),
            confirm_name=confirm,
        )
    if action.kind == "rollback":
        return services.request_rollback(
            **common,
            version=data["version"],
            dry_run=action.dry_run,
            out_of_order=data.get("out_of_order", False),
            non_transactional=data.get("non_transactional", False),
            confirm_name=confirm,
        )
    if action.kind == "cleanup":
        return services.request_cleanup(**common, confirm_name=confirm)
    return services.request_mark(
        **common,
        version=data["version"],
        applied=data["direction"] == "applied",
        confirm_name=confirm,
    )


def preview(target: Target, action: TargetAction) -> dict:
    """What the page shows before anything is requested: read live, nothing written but the
    lock observation."""
    status = services.read_target_status(target)
    scripts = services.script_summaries(target)
    applied = status.applied or []
    context = {"status_error": status.error, "applied": applied, "scripts": [], "versions": []}
    if action.kind == "apply":
        pending = engine.plan.pending(applied, scripts) if not status.error else []
        versions = [s.version for s in pending]
        shown = services.engine_scripts(target, versions=versions) if versions else []
        context["scripts"] = [(s.filename, "up", s.up_sql) for s in shown]
        context["versions"] = versions
    elif action.kind == "rollback":
        newest_first = sorted(
            (e for e in applied if engine.plan.version_of(e.name)),
            key=lambda e: engine.plan.version_key(engine.plan.version_of(e.name)),
            reverse=True,
        )
        context["versions"] = [engine.plan.version_of(e.name) for e in newest_first]
        try:
            _, chosen = engine.plan.rollback_choice(applied, scripts)
            (script,) = services.engine_scripts(target, versions=[chosen.version])
            context["scripts"] = [(script.filename, "down", script.down_sql)]
        except engine.EngineError as error:
            context["plan_error"] = str(error)
    elif action.kind == "mark":
        context["versions"] = [s.version for s in scripts]
    kind = OperationKind.APPLY if action.kind == "apply" else OperationKind.ROLLBACK
    context["dry_run"] = selectors.latest_dry_run(target, kind)
    return context


def make_action(action: TargetAction):
    def run(modeladmin, request, queryset):
        if queryset.count() != 1:
            modeladmin.message_user(
                request, f"Select exactly one target to {action.label.lower()}.", messages.ERROR
            )
            return None
        return redirect("admin:migrations_ops_target_operate", queryset.get().pk, action.slug)

    run.__name__ = action.slug.replace("-", "_")
    return admin.action(description=action.label, permissions=[action.permission])(run)
