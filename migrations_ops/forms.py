from django import forms

from incidents.models import Incident
from incidents.selectors import incidents_to_serve
from migrations_ops.models import FLAG_FIELDS, TARGET_SETTINGS, Environment, Target
from migrations_ops.selectors import flags_of


class TargetForm(forms.ModelForm):
    """The connection URL is write-only: never rendered back, blank on edit keeps it."""

    connection_url = forms.CharField(
        label="Connection URL",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off", "size": 80}),
        help_text="postgresql://user:password@host:5432/db or sqlite:////absolute/path.sqlite3. "
        "Never shown again; leave blank to keep the current one.",
    )
    # Declared for its scheme: a health URL typed without one is taken as https.
    health_url = forms.URLField(
        label="Health URL",
        required=False,
        assume_scheme="https",
        help_text=Target._meta.get_field("health_url").help_text,
    )

    class Meta:
        model = Target
        fields = TARGET_SETTINGS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Compared against a blank initial value, a field left blank is unchanged, so the
        # audit trail records the URL only when a new one is typed.
        self.initial["connection_url"] = ""

    def clean_connection_url(self):
        value = self.cleaned_data["connection_url"]
        if value:
            return value
        if self.instance.pk:
            return self.instance.connection_url
        raise forms.ValidationError("A connection URL is required.")

    def clean(self):
        cleaned = super().clean()
        # Production targets start under the two-person rule; it can be turned off afterwards.
        if not self.instance.pk and cleaned.get("environment") == Environment.PRODUCTION:
            cleaned["requires_approval"] = True
        return cleaned


class ForceUnlockForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
        help_text="Why the lock must go: recorded on the operation and the audit trail.",
    )
    release_fresh = forms.BooleanField(
        required=False,
        label="Release a fresh lock",
        help_text="The lock is younger than the target's lock timeout (or its age is unknown): "
        "a migration may still be running. Tick only if you know its holder is gone.",
    )
    confirm_name = forms.CharField(
        required=False,
        label="Type the target's name to confirm",
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
    )

    def __init__(self, *args, target, **kwargs):
        super().__init__(*args, **kwargs)
        self.target = target
        if target.is_production:
            self.fields["confirm_name"].required = True
            self.fields["confirm_name"].help_text = f"{target.name} is a production target."
        else:
            del self.fields["confirm_name"]
        add_incident_field(self, target)


def add_incident_field(form: forms.Form, target: Target) -> None:
    """Every operation's optional "Incident" choice: the incidents not closed, those affecting
    the target first, the only open one affecting it chosen already. Any incident validates,
    so one closed since the page was shown meets the service's refusal, not a vague error."""
    offered = incidents_to_serve(target)
    field = forms.ModelChoiceField(
        queryset=Incident.objects.all(),
        required=False,
        label="Incident",
        help_text="The incident this operation serves: it appears on that incident's timeline.",
    )
    field.choices = [
        ("", "none"),
        *((incident.pk, _incident_label(incident, target)) for incident in offered),
    ]
    open_here = [incident for incident in offered if incident.affects_target and incident.is_open]
    if len(open_here) == 1:
        field.initial = open_here[0].pk
    form.fields["incident"] = field


def _incident_label(incident: Incident, target: Target) -> str:
    affects = f", affects {target.name}" if incident.affects_target else ""
    return f"#{incident.pk} {incident.title} ({incident.get_status_display().lower()}{affects})"


# --- runtime flags -----------------------------------------------------------------------------
def _flag_field(name: str) -> forms.Field:
    """A form field for one flag, labelled with its runbook name. Bounds are the services'
    (the model fields' validators), so every door gives the same one-line refusal."""
    model_field = Target._meta.get_field(FLAG_FIELDS[name])
    if model_field.get_internal_type() == "BooleanField":
        return forms.BooleanField(label=name, required=False, help_text=model_field.help_text)
    return forms.IntegerField(label=name, help_text=model_field.help_text)


class FlagsForm(forms.Form):
    """The six flags as they are, and the reason for changing some of them."""

    def __init__(self, *args, target: Target, **kwargs):
        super().__init__(*args, initial=flags_of(target), **kwargs)
        for name in FLAG_FIELDS:
            self.fields[name] = _flag_field(name)
        self.fields["reason"] = forms.CharField(
            widget=forms.Textarea(attrs={"rows": 2, "cols": 80}),
            help_text="Recorded in the flag history, the audit trail and open incidents.",
        )

    def changes(self) -> dict:
        """Only the flags changed on the form, so a stale page never undoes another change."""
        return {name: self.cleaned_data[name] for name in FLAG_FIELDS if name in self.changed_data}


class ReenableStepForm(forms.Form):
    step = forms.IntegerField(widget=forms.HiddenInput)
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2, "cols": 80}),
        help_text="Why it is safe to take this step now.",
    )


# Typed when a production target is among those disabled: short, unmistakable, and the same
# whatever the selection (typing every name would slow down the one action meant to be fast).
DISABLE_CONFIRMATION = "DISABLE"


class EmergencyDisableForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
        help_text="Recorded for every target, in its flag history and on open incidents.",
    )
    confirm = forms.CharField(
        label=f"Type {DISABLE_CONFIRMATION} to confirm",
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
    )

    def __init__(self, *args, production: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        if production:
            self.fields[
                "confirm"
            ].help_text = f"Production targets among them: {', '.join(production)}."
        else:
            del self.fields["confirm"]

    def clean_confirm(self):
        value = self.cleaned_data["confirm"].strip()
        if value != DISABLE_CONFIRMATION:
            raise forms.ValidationError(
                f"Type {DISABLE_CONFIRMATION} (in capitals) to disable production targets."
            )
        return value
