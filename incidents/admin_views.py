"""The forms on an incident's admin page: each posts to one view that calls one service, so the
service checks the permission and an error leaves everything as it was."""

from __future__ import annotations

import datetime as dt

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse
from django.utils import timezone

from incidents import selectors, services
from incidents.models import (
    STATUS_ORDER,
    TIMESTAMPS,
    ActionItemKind,
    ActionItemStatus,
    EscalationContact,
    EscalationLevel,
    Incident,
    IncidentStatus,
)
from incidents.postmortem import render_postmortem
from migrations_ops.actors import Actor
from migrations_ops.models import Door
from migrations_ops.refusals import invalid_form_recorded, refusal_recorded
from migrations_ops.services import ServiceError


class IncidentForm(forms.Form):
    """One form of the incident page. ``perform`` calls the service and says what it did."""

    heading = ""  # the heading the page shows

    def __init__(self, *args, incident: Incident, **kwargs):
        super().__init__(*args, **kwargs)
        self.incident = incident

    def perform(self, actor: Actor) -> str:
        raise NotImplementedError


class StatusForm(IncidentForm):
    heading = "Change status"
    status = forms.ChoiceField()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Only forward: an incident never goes back.
        reached = STATUS_ORDER.index(self.incident.status)
        self.fields["status"].choices = [
            (value, IncidentStatus(value).label) for value in STATUS_ORDER[reached + 1 :]
        ]

    def perform(self, actor):
        incident = services.change_status(
            actor=actor, incident=self.incident, status=self.cleaned_data["status"]
        )
        return f"Incident #{incident.pk} is now {incident.get_status_display().lower()}."


class TimestampForm(IncidentForm):
    heading = "Set a timestamp"
    name = forms.ChoiceField(
        label="Timestamp",
        choices=[(name, services.TIMESTAMP_LABELS[name]) for name in TIMESTAMPS],
    )
    when = forms.DateTimeField(label="When (UTC)", help_text="YYYY-MM-DD HH:MM:SS, in UTC.")

    def perform(self, actor):
        name = self.cleaned_data["name"]
        when = self.cleaned_data["when"]
        services.set_timestamp(actor=actor, incident=self.incident, name=name, when=when)
        return f"{services.TIMESTAMP_LABELS[name].capitalize()} set to {services.utc(when)}."


def level_choices():
    contacts = {contact.level: contact for contact in EscalationContact.objects.all()}
    choices = []
    for level in EscalationLevel:
        contact = contacts.get(level.value)
        reaches = (
            f" — {contact.team}: {services.contact_channels(contact)}"
            if contact
            else " — no contact recorded"
        )
        choices.append((level.value, f"{level.label}{reaches}"))
    return choices


class EscalateForm(IncidentForm):
    heading = "Escalate"
    level = forms.TypedChoiceField(coerce=int, choices=[])
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["level"].choices = level_choices()
        self.initial.setdefault("level", min(self.incident.escalation_level + 1, 4))

    def perform(self, actor):
        incident = services.escalate(
            actor=actor,
            incident=self.incident,
            level=self.cleaned_data["level"],
            reason=self.cleaned_data["reason"],
        )
        return f"Incident #{incident.pk} is at {incident.get_escalation_level_display()}."


class CommanderForm(IncidentForm):
    heading = "Change commander"
    commander = forms.ModelChoiceField(queryset=None)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["commander"].queryset = selectors.commanders()

    def perform(self, actor):
        incident = services.change_commander(
            actor=actor, incident=self.incident, commander=self.cleaned_data["commander"]
        )
        return f"{incident.commander_name} now commands incident #{incident.pk}."


class NoteForm(IncidentForm):
    heading = "Add a note"
    text = forms.CharField(label="Note", widget=forms.Textarea(attrs={"rows": 2}))

    def perform(self, actor):
        entry = services.add_note(
            actor=actor, incident=self.incident, text=self.cleaned_data["text"]
        )
        return f"Note #{entry.pk} added."


class CorrectionForm(IncidentForm):
    heading = "Correct a timeline entry"
    entry = forms.ModelChoiceField(queryset=None, label="Entry to correct")
    text = forms.CharField(label="Correction", widget=forms.Textarea(attrs={"rows": 2}))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["entry"].queryset = selectors.timeline(self.incident)
        self.fields["entry"].label_from_instance = lambda entry: f"#{entry.pk} {entry}"

    def perform(self, actor):
        correction = services.correct_entry(
            actor=actor, entry=self.cleaned_data["entry"], text=self.cleaned_data["text"]
        )
        return f"Entry #{self.cleaned_data['entry'].pk} corrected by entry #{correction.pk}."


class ChecklistForm(IncidentForm):
    heading = "Tick a checklist item"
    item = forms.ModelChoiceField(queryset=None, label="Checklist item")
    result = forms.ChoiceField(choices=[("passed", "Passed"), ("failed", "Failed")])
    evidence = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["item"].queryset = self.incident.checklist.order_by("id")

    def perform(self, actor):
        item = services.tick_checklist_item(
            actor=actor,
            item=self.cleaned_data["item"],
            passed=self.cleaned_data["result"] == "passed",
            evidence=self.cleaned_data["evidence"],
        )
        return f"{item.get_key_display()}: {item.result}."


class ActionItemForm(IncidentForm):
    heading = "Add an action item"
    title = forms.CharField(max_length=200)
    kind = forms.ChoiceField(label="Type", choices=ActionItemKind.choices)
    owner = forms.ModelChoiceField(queryset=None)
    due_date = forms.DateField(required=False, help_text="YYYY-MM-DD")
    link = forms.CharField(required=False, help_text="Where the work is tracked (ticket, PR).")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["owner"].queryset = selectors.active_users()

    def perform(self, actor):
        item = services.add_action_item(actor=actor, incident=self.incident, **self.cleaned_data)
        return f"Action item #{item.pk} added."


KEEP = ("", "(unchanged)")


class ActionItemUpdateForm(IncidentForm):
    """Blank fields stay as they are."""

    heading = "Update an action item"

    item = forms.ModelChoiceField(queryset=None, label="Action item")
    status = forms.ChoiceField(required=False, choices=[KEEP, *ActionItemStatus.choices])
    due_date = forms.DateField(required=False, help_text="YYYY-MM-DD")
    owner = forms.ModelChoiceField(queryset=None, required=False)
    link = forms.CharField(required=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["item"].queryset = self.incident.action_items.order_by("id")
        self.fields["owner"].queryset = selectors.active_users()

    def perform(self, actor):
        data = self.cleaned_data
        changes = {
            name: data[name]
            for name in ("status", "due_date", "owner", "link")
            if data[name] not in (None, "")
        }
        item = services.update_action_item(actor=actor, item=data["item"], **changes)
        return f"Action item #{item.pk} updated."


class AddendumForm(IncidentForm):
    heading = "Add an addendum to the post-mortem"
    text = forms.CharField(label="Addendum", widget=forms.Textarea(attrs={"rows": 3}))

    def perform(self, actor):
        addendum = services.add_addendum(
            actor=actor, incident=self.incident, text=self.cleaned_data["text"]
        )
        return f"Addendum #{addendum.pk} appended to the post-mortem."


# URL slug → form, in the order the page shows them.
INCIDENT_FORMS = {
    "status": StatusForm,
    "timestamp": TimestampForm,
    "escalate": EscalateForm,
    "commander": CommanderForm,
    "note": NoteForm,
    "correct": CorrectionForm,
    "checklist": ChecklistForm,
    "action-item": ActionItemForm,
    "update-action-item": ActionItemUpdateForm,
    "addendum": AddendumForm,
}


# What the services refuse on a closed incident, and the addendum that only a closed one takes.
CLOSED_HIDDEN = frozenset({"status", "timestamp", "escalate", "commander", "checklist"})
OPEN_HIDDEN = frozenset({"addendum"})


def form_error_line(form: forms.Form) -> str:
    return "; ".join(
        f"{form[name].label}: {errors[0]}" if name != "__all__" else errors[0]
        for name, errors in form.errors.items()
    ).replace("\n", " ")


def change_url(incident_id: int) -> str:
    return reverse("admin:incidents_incident_change", args=[incident_id])


def incident_forms(incident: Incident) -> list[tuple[str, str, forms.Form]]:
    """(slug, action URL, unbound form) for the page; the addendum only once closed."""
    hidden = CLOSED_HIDDEN if incident.status == IncidentStatus.CLOSED else OPEN_HIDDEN
    if not incident.action_items.exists():
        hidden |= {"update-action-item"}
    shown = []
    for slug, form_class in INCIDENT_FORMS.items():
        if slug in hidden:
            continue
        url = reverse("admin:incidents_incident_act", args=[incident.pk, slug])
        shown.append((slug, url, form_class(incident=incident, auto_id=f"id_{slug}_%s")))
    return shown


def act_view(model_admin, request, incident_id: int, slug: str):
    """POST only; the outcome is one admin message and a redirect back to the incident."""
    form_class = INCIDENT_FORMS.get(slug)
    if form_class is None:
        raise Http404(f"no such incident form: {slug}")
    if request.method != "POST":
        return redirect(change_url(incident_id))
    incident = get_object_or_404(Incident, pk=incident_id)
    form = form_class(request.POST, incident=incident)
    # The page asks for UTC, whatever the console's own time zone.
    with timezone.override(dt.UTC):
        valid = form.is_valid()
    if not valid:
        invalid_form_recorded(request, f"incident.{slug}", form, subject=incident)
        model_admin.message_user(request, form_error_line(form), messages.ERROR)
        return redirect(change_url(incident.pk))
    try:
        done = form.perform(Actor.for_user(request.user, Door.ADMIN))
    except ServiceError as error:
        refusal_recorded(request, f"incident.{slug}", error, subject=incident)
        model_admin.message_user(request, str(error), messages.ERROR)
    else:
        model_admin.message_user(request, done, messages.SUCCESS)
    return redirect(change_url(incident.pk))


def postmortem_view(model_admin, request, incident_id: int):
    incident = get_object_or_404(Incident, pk=incident_id)
    if not model_admin.has_view_permission(request, incident):
        raise PermissionDenied
    markdown = render_postmortem(selectors.postmortem_data(incident))
    response = HttpResponse(markdown, content_type="text/markdown; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="incident-{incident.pk}-postmortem.md"'
    return response
