"""Incidents, their recovery objectives and their append-only timelines."""

from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from migrations_ops.models import Operation, Target
from opsconsole.append_only import AppendOnlyModel

# What opening and running an incident take, whichever door asks (services check them).
OPEN_PERMISSION = "incidents.add_incident"
CHANGE_PERMISSION = "incidents.change_incident"


class Scenario(models.TextChoices):
    """The runbook's four rollback scenarios, and the rest."""

    MIGRATION_FAILURE = "migration_failure", "Migration failure"
    PERFORMANCE_DEGRADATION = "performance_degradation", "Performance degradation"
    CONCURRENT_CONFLICT = "concurrent_conflict", "Concurrent migration conflict"
    PRODUCTION_EMERGENCY = "production_emergency", "Production emergency"
    OTHER = "other", "Other"


class Severity(models.TextChoices):
    SEV1 = "sev1", "SEV1"
    SEV2 = "sev2", "SEV2"
    SEV3 = "sev3", "SEV3"
    SEV4 = "sev4", "SEV4"


class IncidentStatus(models.TextChoices):
    # In this order: an incident only ever moves forward (services.change_status).
    DETECTED = "detected", "Detected"
    MITIGATING = "mitigating", "Mitigating"
    MONITORING = "monitoring", "Monitoring"
    RESOLVED = "resolved", "Resolved"
    POST_MORTEM = "post_mortem", "Post-mortem"
    CLOSED = "closed", "Closed"


STATUS_ORDER = list(IncidentStatus.values)
# Still under way: operations on an affected target land on these incidents' timelines.
OPEN_STATUSES = (IncidentStatus.DETECTED, IncidentStatus.MITIGATING, IncidentStatus.MONITORING)


class EscalationLevel(models.IntegerChoices):
    """The runbook's escalation path."""

    ON_CALL = 1, "Level 1: on-call engineer (check runbook)"
    DATABASE_TEAM = 2, "Level 2: database team (schema issues)"
    PLATFORM_TEAM = 3, "Level 3: platform team (infrastructure issues)"
    INCIDENT_COMMANDER = 4, "Level 4: incident commander (major outage)"


# The incident's timestamps, in the chronological order they must keep.
TIMESTAMPS = ("impact_started", "detected", "mitigated", "recovered")
# Objective phase → the timestamp that ends it.
PHASES = {"detect": "detected", "mitigate": "mitigated", "recover": "recovered"}


class RecoveryObjective(models.Model):
    """The runbook's Recovery Time Objectives for one scenario. Incidents copy them when they
    open, so editing a row here changes only incidents opened afterwards."""

    scenario = models.CharField(max_length=30, choices=Scenario.choices, unique=True)
    runbook_row = models.CharField(
        max_length=60, blank=True, help_text="The runbook table's row these come from."
    )
    detect_within = models.DurationField()
    mitigate_within = models.DurationField()
    recover_within = models.DurationField()
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["scenario"]

    def __str__(self) -> str:
        return f"{self.get_scenario_display()} objectives"


class Incident(models.Model):
    title = models.CharField(max_length=200)
    scenario = models.CharField(max_length=30, choices=Scenario.choices)
    severity = models.CharField(max_length=4, choices=Severity.choices)
    status = models.CharField(
        max_length=20, choices=IncidentStatus.choices, default=IncidentStatus.DETECTED
    )
    commander = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    # A copy, so the record survives a deleted user.
    commander_name = models.CharField(max_length=150, blank=True)
    affected_targets = models.ManyToManyField(Target, blank=True, related_name="incidents")
    culprit_migration = models.CharField(max_length=255, blank=True)
    escalation_level = models.PositiveSmallIntegerField(
        choices=EscalationLevel.choices,
        default=EscalationLevel.ON_CALL,
        validators=[MinValueValidator(1), MaxValueValidator(4)],
    )
    opened_at = models.DateTimeField(default=timezone.now)
    opened_by = models.CharField(max_length=150)

    # Each with who set it and whether the console set it by itself (TIMESTAMPS).
    impact_started_at = models.DateTimeField(null=True, blank=True)
    impact_started_by = models.CharField(max_length=150, blank=True)
    impact_started_auto = models.BooleanField(default=False, help_text="Set by the console itself.")
    detected_at = models.DateTimeField(null=True, blank=True)
    detected_by = models.CharField(max_length=150, blank=True)
    detected_auto = models.BooleanField(default=False, help_text="Set by the console itself.")
    mitigated_at = models.DateTimeField(null=True, blank=True)
    mitigated_by = models.CharField(max_length=150, blank=True)
    mitigated_auto = models.BooleanField(default=False, help_text="Set by the console itself.")
    recovered_at = models.DateTimeField(null=True, blank=True)
    recovered_by = models.CharField(max_length=150, blank=True)
    recovered_auto = models.BooleanField(default=False, help_text="Set by the console itself.")

    # Copied from the scenario's RecoveryObjective at opening; empty when it had none.
    detect_objective = models.DurationField(null=True, blank=True)
    mitigate_objective = models.DurationField(null=True, blank=True)
    recover_objective = models.DurationField(null=True, blank=True)

    # The post-mortem.
    summary = models.TextField(blank=True)
    impact = models.TextField(blank=True, help_text="Who and what was hit, with numbers.")
    trigger = models.TextField(blank=True)
    root_cause = models.TextField(blank=True)
    contributing_factors = models.TextField(blank=True)
    detection = models.TextField(
        blank=True, help_text="How it was noticed, and how to notice it sooner."
    )
    resolution = models.TextField(blank=True)
    went_well = models.TextField(blank=True)
    went_wrong = models.TextField(blank=True)
    got_lucky = models.TextField(blank=True)
    prevention = models.TextField(blank=True, verbose_name="prevention measures")
    process_improvements = models.TextField(blank=True)
    no_action_items_reason = models.TextField(
        blank=True,
        verbose_name="why no action items",
        help_text="Closing needs at least one action item, or this written reason.",
    )
    # Set when the incident closes: the post-mortem is frozen from then on (addenda only).
    closed_at = models.DateTimeField(null=True, blank=True)
    # A rehearsal (Drill): scored like an incident, kept out of the real incident figures.
    is_drill = models.BooleanField(default=False)

    class Meta:
        ordering = ["-opened_at", "-id"]
        indexes = [models.Index(fields=["status", "opened_at"])]

    def __str__(self) -> str:
        return f"#{self.pk} {self.title}"

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    def objective(self, phase: str) -> dt.timedelta | None:
        return getattr(self, f"{phase}_objective")


class EscalationContact(models.Model):
    """Who each level of the runbook's escalation path reaches; seeded from the runbook and
    edited by console admins. An escalation copies the contact onto the timeline, so editing a
    row never rewrites who was reached."""

    level = models.PositiveSmallIntegerField(choices=EscalationLevel.choices, unique=True)
    team = models.CharField(max_length=100)
    reaches = models.TextField(
        help_text="How to reach them: channel, pager service, address (one per line)."
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["level"]

    def __str__(self) -> str:
        return f"Level {self.level}: {self.team}"


class ActionItemKind(models.TextChoices):
    CORRECTIVE = "corrective", "Corrective"
    PREVENTIVE = "preventive", "Preventive"
    DETECTIVE = "detective", "Detective"


class ActionItemStatus(models.TextChoices):
    OPEN = "open", "Open"
    IN_PROGRESS = "in_progress", "In progress"
    DONE = "done", "Done"
    WONT_DO = "wont_do", "Won't do"


class ActionItem(models.Model):
    """A follow-up of an incident: who owns it, what kind of fix it is, by when, and where it is
    tracked."""

    incident = models.ForeignKey(Incident, on_delete=models.PROTECT, related_name="action_items")
    title = models.CharField(max_length=200)
    kind = models.CharField(max_length=12, choices=ActionItemKind.choices)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    # A copy, so the record survives a deleted user.
    owner_name = models.CharField(max_length=150)
    due_date = models.DateField(null=True, blank=True)
    status = models.CharField(
        max_length=12, choices=ActionItemStatus.choices, default=ActionItemStatus.OPEN
    )
    link = models.URLField(blank=True, help_text="Where the work is tracked (ticket, PR).")
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.CharField(max_length=150)

    class Meta:
        ordering = ["incident", "id"]
        indexes = [models.Index(fields=["status", "due_date"])]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.title} ({self.owner_name})"


class PostmortemAddendum(AppendOnlyModel):
    """What was learned after an incident closed. Its post-mortem is frozen; addenda are
    appended to it and are append-only themselves."""

    incident = models.ForeignKey(Incident, on_delete=models.PROTECT, related_name="addenda")
    added_at = models.DateTimeField(default=timezone.now)
    added_by = models.CharField(max_length=150)
    text = models.TextField()

    class Meta:
        ordering = ["incident", "added_at", "id"]
        verbose_name_plural = "post-mortem addenda"

    def __str__(self) -> str:
        return f"Addendum to #{self.incident_id} by {self.added_by}"


class EntryKind(models.TextChoices):
    OPENED = "opened", "Opened"
    STATUS = "status", "Status change"
    TIMESTAMP = "timestamp", "Timestamp"
    ESCALATION = "escalation", "Escalation"
    OPERATION = "operation", "Operation"
    NOTE = "note", "Note"
    EDIT = "edit", "Edit"
    CHECKLIST = "checklist", "Checklist"
    CORRECTION = "correction", "Correction"
    ACTION_ITEM = "action_item", "Action item"
    ADDENDUM = "addendum", "Post-mortem addendum"
    FLAG = "flag", "Flag change"


class TimelineEntry(AppendOnlyModel):
    """One line of an incident's timeline. Append-only like migrations_ops.AuditEvent: a
    correction is a new entry pointing at the one it corrects."""

    incident = models.ForeignKey(Incident, on_delete=models.PROTECT, related_name="timeline")
    occurred_at = models.DateTimeField(default=timezone.now)
    kind = models.CharField(max_length=20, choices=EntryKind.choices)
    text = models.TextField()
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    actor_name = models.CharField(max_length=150)
    operation = models.ForeignKey(
        Operation,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    corrects = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="corrections",
    )
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["occurred_at", "id"]
        verbose_name_plural = "timeline entries"
        indexes = [models.Index(fields=["incident", "occurred_at", "id"])]

    def __str__(self) -> str:
        return f"{self.occurred_at:%Y-%m-%d %H:%M:%S} {self.actor_name}: {self.text[:60]}"


class ChecklistKey(models.TextChoices):
    """The runbook's post-rollback validation checklist, in its order."""

    AUTO_MIGRATE = "auto_migrate", "AUTO_MIGRATE set correctly"
    NO_STUCK_LOCKS = "no_stuck_locks", "No stuck locks"
    TRACKING_CONSISTENT = "tracking_consistent", "Migration tracking consistent"
    API_RESPONDING = "api_responding", "API endpoints responding"
    MONITORING_NORMAL = "monitoring_normal", "Monitoring normal"
    NO_MIGRATION_ATTEMPTS = "no_migration_attempts", "No migration attempts in logs"


CHECKLIST_KEYS = list(ChecklistKey.values)
# What the console always checks by itself from a live read of each affected target
# (services.run_checks). HEALTH_CHECK joins them when at least one affected target has a health
# URL to ask (Target.health_url); otherwise it stays, like the rest, for a person to tick with
# evidence.
AUTOMATIC_CHECKS = (ChecklistKey.NO_STUCK_LOCKS, ChecklistKey.TRACKING_CONSISTENT)
HEALTH_CHECK = ChecklistKey.API_RESPONDING


class CheckResult(models.TextChoices):
    PENDING = "pending", "Pending"
    PASSED = "passed", "Passed"
    FAILED = "failed", "Failed"


class ChecklistItem(models.Model):
    """One item of an incident's validation checklist; every incident has all of them from its
    opening (services.open_incident)."""

    incident = models.ForeignKey(Incident, on_delete=models.PROTECT, related_name="checklist")
    key = models.CharField(max_length=30, choices=ChecklistKey.choices)
    result = models.CharField(
        max_length=10, choices=CheckResult.choices, default=CheckResult.PENDING
    )
    evidence = models.TextField(blank=True)
    checked_by = models.CharField(max_length=150, blank=True)
    checked_at = models.DateTimeField(null=True, blank=True)
    automatic = models.BooleanField(default=False, help_text="Checked by the console itself.")

    class Meta:
        ordering = ["incident", "id"]
        constraints = [
            models.UniqueConstraint(fields=["incident", "key"], name="one_checklist_item_per_key")
        ]

    def __str__(self) -> str:
        return f"{self.get_key_display()}: {self.get_result_display().lower()}"


class DrillKind(models.TextChoices):
    """The runbook's regular drills."""

    LOCK_RELEASE = "lock_release", "Lock release (monthly)"
    ROLLBACK = "rollback", "Rollback simulation (quarterly)"


# How often each drill is due; a drill not run for longer is overdue.
DRILL_INTERVALS = {
    DrillKind.LOCK_RELEASE: dt.timedelta(days=31),
    DrillKind.ROLLBACK: dt.timedelta(days=92),
}


class Drill(models.Model):
    """A rehearsal of one runbook procedure on a sandbox target, on a schedule (a
    django-celery-beat periodic task) and on demand."""

    kind = models.CharField(max_length=20, choices=DrillKind.choices)
    target = models.ForeignKey(Target, on_delete=models.PROTECT, related_name="drills")
    enabled = models.BooleanField(default=True)
    periodic_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["kind", "target"]
        constraints = [
            models.UniqueConstraint(fields=["kind", "target"], name="one_drill_per_kind_and_target")
        ]
        permissions = [("run_drill", "Can run a drill")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} on {self.target}"

    @property
    def interval(self) -> dt.timedelta:
        return DRILL_INTERVALS[self.kind]


class DrillRunStatus(models.TextChoices):
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class DrillRun(models.Model):
    """One run of a drill: the fault it made, the procedure it followed, its drill incident."""

    drill = models.ForeignKey(Drill, on_delete=models.PROTECT, related_name="runs")
    incident = models.OneToOneField(
        Incident, null=True, blank=True, on_delete=models.PROTECT, related_name="drill_run"
    )
    status = models.CharField(
        max_length=10, choices=DrillRunStatus.choices, default=DrillRunStatus.RUNNING
    )
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    started_by = models.CharField(max_length=150)
    scheduled = models.BooleanField(default=False, help_text="Started by the schedule.")
    # Seconds from the fault to detection, mitigation and recovery, as measured by the run.
    detect_seconds = models.FloatField(null=True, blank=True)
    mitigate_seconds = models.FloatField(null=True, blank=True)
    recover_seconds = models.FloatField(null=True, blank=True)
    met_objectives = models.BooleanField(null=True, blank=True)
    log = models.TextField(blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-started_at", "-id"]
        indexes = [models.Index(fields=["drill", "started_at"])]

    def __str__(self) -> str:
        return f"{self.drill} at {self.started_at:%Y-%m-%d %H:%M} ({self.status})"
