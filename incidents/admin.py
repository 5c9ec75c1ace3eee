"""The admin door onto incidents: thin, every write goes through ``services``."""

from __future__ import annotations

import datetime as dt

from django import forms
from django.contrib import admin, messages
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from incidents import admin_views, selectors, services
from incidents.models import (
    ActionItem,
    ChecklistItem,
    Drill,
    DrillRun,
    EscalationContact,
    Incident,
    IncidentStatus,
    PostmortemAddendum,
    RecoveryObjective,
    TimelineEntry,
)
from migrations_ops.actors import Actor
from migrations_ops.admin.common import ReadOnlyAdmin
from migrations_ops.admin.history import AuditHistoryMixin
from migrations_ops.models import Door, Environment, Target
from migrations_ops.refusals import refusal_recorded
from migrations_ops.services import ServiceError

VERDICT_COLOURS = {
    selectors.MET: "#2e7d32",
    selectors.PENDING: "#b26a00",
    selectors.BREACHED: "#c62828",
    selectors.UNKNOWN: "#666",
}


def minutes(value: dt.timedelta | None) -> str:
    if value is None:
        return "-"
    seconds = int(value.total_seconds())
    return f"{seconds // 60}m{seconds % 60:02d}s"


class BreachedFilter(admin.SimpleListFilter):
    title = "objective breached"
    parameter_name = "breached"

    def lookups(self, request, model_admin):
        return [("yes", "Breached"), ("no", "Not breached")]

    def queryset(self, request, queryset):
        breaching = selectors.incidents_breaching(Incident.objects.all()).values("pk")
        if self.value() == "yes":
            return queryset.filter(pk__in=breaching)
        if self.value() == "no":
            return queryset.exclude(pk__in=breaching)
        return queryset


class DrillsFilter(admin.SimpleListFilter):
    """Real incidents by default: drills are rehearsals, kept out of the real figures."""

    title = "drills"
    parameter_name = "drills"
    DEFAULT = "real"

    def lookups(self, request, model_admin):
        return [("real", "Real incidents only"), ("drills", "Drills only"), ("all", "All")]

    def value(self):
        return super().value() or self.DEFAULT

    def choices(self, changelist):
        for lookup, title in self.lookup_choices:
            yield {
                "selected": self.value() == lookup,
                "query_string": changelist.get_query_string({self.parameter_name: lookup}),
                "display": title,
            }

    def queryset(self, request, queryset):
        if self.value() == "drills":
            return queryset.filter(is_drill=True)
        if self.value() == "all":
            return queryset
        return queryset.filter(is_drill=False)


class ReadOnlyInline(admin.TabularInline):
    """Rows shown on the incident's page; every write goes through ``services`` (the page's
    own forms and the "Run checks" action)."""

    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_view_permission(self, request, obj=None):
        return request.user.has_perm("incidents.view_incident")


class ChecklistInline(ReadOnlyInline):
    """The validation checklist."""

    model = ChecklistItem
    fields = ["key", "result", "evidence", "checked_by", "checked_at_utc", "automatic"]
    readonly_fields = fields

    @admin.display(description="Checked at (UTC)")
    def checked_at_utc(self, obj):
        return services.utc(obj.checked_at) if obj.checked_at else "-"


class ActionItemInline(ReadOnlyInline):
    """The follow-ups."""

    model = ActionItem
    fields = ["id", "title", "kind", "owner_name", "due_date", "status", "link", "created_by"]
    readonly_fields = fields


@admin.register(Incident)
class IncidentAdmin(AuditHistoryMixin, admin.ModelAdmin):
    list_display = [
        "id",
        "title",
        "severity",
        "scenario",
        "status",
        "escalation_level",
        "commander_name",
        "opened_at",
        "objectives_column",
    ]
    list_display_links = ["id", "title"]
    list_filter = [
        DrillsFilter,
        "status",
        "severity",
        "scenario",
        "affected_targets",
        BreachedFilter,
    ]
    actions = ["run_checks"]
    search_fields = ["title", "culprit_migration", "commander_name"]
    filter_horizontal = ["affected_targets"]
    add_fields = [
        "title",
        "scenario",
        "severity",
        "commander",
        "affected_targets",
        "culprit_migration",
        "impact_started_at",
    ]
    state_fields = [
        "scenario",
        "status",
        "escalation_level",
        "commander_name",
        "affected_targets_display",
        "operations_display",
        "opened_at",
        "opened_by",
        "timestamps_display",
        "objectives_display",
        "closed_at",
        "timeline_display",
        "addenda_display",
    ]

    def has_delete_permission(self, request, obj=None):
        return False  # its timeline is append-only; an incident is closed, never deleted

    def get_inlines(self, request, obj):
        return [] if obj is None else [ChecklistInline, ActionItemInline]

    def get_changeform_initial_data(self, request):
        # The opener commands unless they name someone else.
        return {**super().get_changeform_initial_data(request), "commander": request.user.pk}

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "commander":
            kwargs["queryset"] = selectors.commanders()
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def get_urls(self):
        return [
            path(
                "<int:incident_id>/act/<slug:slug>/",
                self.admin_site.admin_view(self.act_view),
                name="incidents_incident_act",
            ),
            path(
                "<int:incident_id>/postmortem.md",
                self.admin_site.admin_view(self.postmortem_view),
                name="incidents_incident_postmortem",
            ),
            *super().get_urls(),
        ]

    def act_view(self, request, incident_id: int, slug: str):
        return admin_views.act_view(self, request, incident_id, slug)

    def postmortem_view(self, request, incident_id: int):
        return admin_views.postmortem_view(self, request, incident_id)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        incident = self.get_object(request, object_id)
        if incident is not None:
            extra_context = {
                **(extra_context or {}),
                "postmortem_url": reverse(
                    "admin:incidents_incident_postmortem", args=[incident.pk]
                ),
                "incident_forms": (
                    admin_views.incident_forms(incident)
                    if self.has_change_permission(request, incident)
                    else []
                ),
            }
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.action(description="Run checks", permissions=["change"])
    def run_checks(self, request, queryset):
        actor = Actor.for_user(request.user, Door.ADMIN)
        for incident in queryset.order_by("pk"):
            try:
                items = services.run_checks(actor=actor, incident=incident)
            except ServiceError as error:
                refusal_recorded(request, "incident.run_checks", error, subject=incident)
                self.message_user(request, f"#{incident.pk}: {error}", messages.ERROR)
                continue
            summary = ", ".join(f"{item.get_key_display()} {item.result}" for item in items)
            level = (
                messages.SUCCESS if all(i.result == "passed" for i in items) else messages.WARNING
            )
            self.message_user(request, f"#{incident.pk}: {summary}", level)

    def get_fields(self, request, obj=None):
        if obj is None:
            return self.add_fields
        return [*self.state_fields, *services.EDITABLE_FIELDS]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        if obj.status == IncidentStatus.CLOSED:
            # Frozen: what comes later goes into addenda.
            return [*self.state_fields, *services.EDITABLE_FIELDS]
        return self.state_fields

    @admin.display(description="Objectives")
    def objectives_column(self, obj):
        return format_html_join(
            " ",
            '<span style="color:{}" title="{}">{}</span>',
            (
                (VERDICT_COLOURS[result.verdict], result.verdict, result.phase[0].upper())
                for result in selectors.objective_results(obj)
            ),
        )

    @admin.display(description="Affected targets")
    def affected_targets_display(self, obj):
        return ", ".join(target.name for target in obj.affected_targets.order_by("name")) or "-"

    @admin.display(description="Operations serving it")
    def operations_display(self, obj):
        operations = obj.operations.select_related("target").order_by("requested_at", "id")
        links = (
            (
                reverse("admin:migrations_ops_operation_change", args=[operation.pk]),
                operation.pk,
                operation.get_kind_display(),
                operation.target.name,
                operation.get_status_display().lower(),
            )
            for operation in operations
        )
        return format_html_join(", ", '<a href="{}">#{} {} on {}</a> ({})', links) or "-"

    @admin.display(description="Timestamps (UTC)")
    def timestamps_display(self, obj):
        rows = []
        for name in ("impact_started", "detected", "mitigated", "recovered"):
            at = getattr(obj, f"{name}_at")
            by = getattr(obj, f"{name}_by")
            how = " (automatically)" if getattr(obj, f"{name}_auto") else ""
            rows.append((services.TIMESTAMP_LABELS[name], services.utc(at), f"{by}{how}"))
        return format_html(
            "<table>{}</table>",
            format_html_join("", "<tr><th>{}</th><td>{}</td><td>{}</td></tr>", rows),
        )

    @admin.display(description="Recovery objectives (copied at opening)")
    def objectives_display(self, obj):
        rows = (
            (
                result.phase,
                minutes(result.elapsed),
                minutes(result.objective),
                VERDICT_COLOURS[result.verdict],
                result.verdict,
            )
            for result in selectors.objective_results(obj)
        )
        return format_html(
            "<table><tr><th>phase</th><th>took</th><th>objective</th><th></th></tr>{}</table>",
            format_html_join(
                "",
                '<tr><td>{}</td><td>{}</td><td>{}</td><td style="color:{}">{}</td></tr>',
                rows,
            ),
        )

    @admin.display(description="Timeline (UTC)")
    def timeline_display(self, obj):
        rows = (
            (
                entry.pk,
                services.utc(entry.occurred_at),
                entry.get_kind_display(),
                entry.actor_name,
                entry.text,
            )
            for entry in selectors.timeline(obj)
        )
        return format_html(
            '<table class="timeline"><tr><th>#</th><th>when</th><th>what</th><th>who</th>'
            "<th></th></tr>{}</table>",
            format_html_join(
                "",
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                rows,
            ),
        )

    @admin.display(description="Post-mortem addenda")
    def addenda_display(self, obj):
        rows = (
            (services.utc(addendum.added_at), addendum.added_by, addendum.text)
            for addendum in obj.addenda.order_by("added_at", "id")
        )
        return format_html(
            "<table>{}</table>",
            format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", rows),
        )

    def save_model(self, request, obj, form, change):
        actor = Actor.for_user(request.user, Door.ADMIN)
        if change:
            services.update_incident(actor=actor, incident=obj, changed=form.changed_data)
            return
        incident = services.open_incident(
            actor=actor,
            title=obj.title,
            scenario=obj.scenario,
            severity=obj.severity,
            targets=list(form.cleaned_data.get("affected_targets") or []),
            culprit_migration=obj.culprit_migration,
            impact_started_at=obj.impact_started_at,
            commander=obj.commander,
        )
        # The admin goes on with the form's instance (logging, redirect): make it the new row.
        obj.__dict__.update(incident.__dict__)

    def save_related(self, request, form, formsets, change):
        if change:
            super().save_related(request, form, formsets, change)
        # On add, open_incident has set the affected targets already.

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except ServiceError as error:
            refusal_recorded(request, "incident.change", error)
            self.message_user(request, str(error), messages.ERROR)
            return self.response_post_save_change(request, None)


@admin.register(RecoveryObjective)
class RecoveryObjectiveAdmin(admin.ModelAdmin):
    """Edited by incident commanders; incidents already open keep the objectives they copied."""

    list_display = ["scenario", "runbook_row", "detect_within", "mitigate_within", "recover_within"]
    readonly_fields = ["updated_at"]


@admin.register(TimelineEntry)
class TimelineEntryAdmin(ReadOnlyAdmin):
    list_display = ["occurred_at", "incident", "kind", "actor_name", "text"]
    list_filter = ["kind"]
    list_select_related = ["incident"]
    raw_id_fields = ["incident", "operation", "corrects"]
    fields = ["occurred_at", "incident", "kind", "actor_name", "text", "operation", "corrects"]
    readonly_fields = fields


@admin.register(EscalationContact)
class EscalationContactAdmin(admin.ModelAdmin):
    """Who each escalation level reaches. Escalations copy the contact onto the timeline, so
    editing a row here changes only later escalations."""

    list_display = ["level", "team", "reaches", "updated_at"]
    readonly_fields = ["updated_at"]

    def has_delete_permission(self, request, obj=None):
        return False  # every level of the runbook's path has someone to reach


@admin.register(ActionItem)
class ActionItemAdmin(AuditHistoryMixin, ReadOnlyAdmin):
    """Every follow-up across incidents; changed from its incident's page."""

    list_display = ["id", "incident", "title", "kind", "owner_name", "due_date", "status"]
    list_filter = ["status", "kind"]
    list_select_related = ["incident"]
    search_fields = ["title", "owner_name"]
    fields = [*list_display, "link", "created_at", "created_by"]
    readonly_fields = fields


@admin.register(PostmortemAddendum)
class PostmortemAddendumAdmin(ReadOnlyAdmin):
    list_display = ["added_at", "incident", "added_by", "text"]
    list_select_related = ["incident"]
    fields = list_display
    readonly_fields = fields


# --- drills ----------------------------------------------------------------------------------
def crontab_text(drill: Drill) -> str:
    task = drill.periodic_task
    if task is None or task.crontab is None:
        return "not scheduled"
    crontab = task.crontab
    months = "every month" if crontab.month_of_year == "*" else f"months {crontab.month_of_year}"
    when = (
        f"day {crontab.day_of_month} of {months}, {int(crontab.hour):02d}:{int(crontab.minute):02d}"
    )
    return f"{when} {crontab.timezone}" + ("" if task.enabled else " (disabled)")


class DrillForm(forms.ModelForm):
    class Meta:
        model = Drill
        fields = ["kind", "target", "enabled"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "target" in self.fields:
            self.fields["target"].queryset = Target.objects.filter(
                environment=Environment.SANDBOX
            ).order_by("name")
            self.fields["target"].help_text = "Drills make real faults: sandbox targets only."


@admin.register(Drill)
class DrillAdmin(admin.ModelAdmin):
    """The runbook's drills: scheduled (django-celery-beat) through ``services.schedule_drill``,
    run on demand on a worker (``services.request_drill``), like an operation."""

    form = DrillForm
    list_display = ["kind", "target", "enabled", "schedule", "last_run", "overdue"]
    list_select_related = ["target", "periodic_task__crontab"]
    actions = ["run_now"]

    def get_readonly_fields(self, request, obj=None):
        shown = ["schedule", "last_run", "overdue", "created_at"]
        return [*shown, "kind", "target"] if obj is not None else shown

    def get_fields(self, request, obj=None):
        return ["kind", "target", "enabled", "schedule", "last_run", "overdue", "created_at"]

    def save_model(self, request, obj, form, change):
        drill = services.schedule_drill(
            actor=Actor.for_user(request.user, Door.ADMIN),
            kind=obj.kind,
            target=obj.target,
            enabled=obj.enabled,
        )
        obj.pk = drill.pk
        obj.periodic_task = drill.periodic_task

    def has_delete_permission(self, request, obj=None):
        return False  # its runs are history; disable it instead

    def has_run_drill_permission(self, request):
        return request.user.has_perm("incidents.run_drill")

    @admin.display(description="Schedule (UTC)")
    def schedule(self, obj):
        return crontab_text(obj) if obj.pk else "-"

    @admin.display(description="Last run")
    def last_run(self, obj):
        run = selectors.drill_state(obj).last_run if obj.pk else None
        if run is None:
            return "never"
        return format_html(
            '<a href="{}">#{} {}</a>, {}',
            reverse("admin:incidents_drillrun_change", args=[run.pk]),
            run.pk,
            run.get_status_display().lower(),
            services.utc(run.started_at),
        )

    @admin.display(description="Overdue")
    def overdue(self, obj):
        # In words, as on the dashboard: a red "no" icon would read as a problem.
        if not obj.pk:
            return "-"
        state = selectors.drill_state(obj)
        if not state.overdue:
            return f"no, due {state.due_since:%Y-%m-%d}"
        if state.due_since is None:
            return "OVERDUE (never succeeded)"
        return f"OVERDUE since {state.due_since:%Y-%m-%d}"

    @admin.action(description="Run drill now (on a worker)", permissions=["run_drill"])
    def run_now(self, request, queryset):
        actor = Actor.for_user(request.user, Door.ADMIN)
        for drill in queryset.select_related("target"):
            try:
                run = services.request_drill(actor=actor, drill=drill)
            except ServiceError as error:
                refusal_recorded(request, "drill.run_now", error, subject=drill)
                self.message_user(request, f"{drill}: {error}", messages.ERROR)
            else:
                self.message_user(
                    request,
                    format_html(
                        '{}: run <a href="{}">#{}</a> started',
                        drill,
                        reverse("admin:incidents_drillrun_change", args=[run.pk]),
                        run.pk,
                    ),
                    messages.SUCCESS,
                )


@admin.register(DrillRun)
class DrillRunAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "drill",
        "status",
        "started_at",
        "started_by",
        "scheduled",
        "detect_seconds",
        "mitigate_seconds",
        "recover_seconds",
        "met_objectives",
        "incident_link",
    ]
    list_filter = ["status", "drill__kind", "scheduled"]
    list_select_related = ["drill__target", "incident"]
    fields = [*list_display, "finished_at", "error", "log"]
    readonly_fields = fields

    @admin.display(description="Drill incident")
    def incident_link(self, obj):
        if obj.incident_id is None:
            return "-"
        return format_html(
            '<a href="{}">#{}</a>',
            reverse("admin:incidents_incident_change", args=[obj.incident_id]),
            obj.incident_id,
        )
