"""Targets, what the console last saw of their locks, operations on them, and the audit trail."""

from __future__ import annotations

import datetime as dt
import re

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from migrations_ops import engine
from migrations_ops.engine import health
from migrations_ops.fields import EncryptedTextField
from opsconsole.append_only import AppendOnlyModel


def validate_target_url(value: str) -> None:
    try:
        dialect = engine.dialect_of(value)
        if dialect == "sqlite":
            engine.target_url.sqlite_path(value)
    except engine.EngineError as error:
        raise ValidationError(str(error)) from None


# What the console accepts as a target's schema name (Target.clean).
SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$-]*")


class Environment(models.TextChoices):
    PRODUCTION = "production", "Production"
    STAGING = "staging", "Staging"
    DEVELOPMENT = "development", "Development"
    SANDBOX = "sandbox", "Sandbox"


class Door(models.TextChoices):
    """Which way into the console an action came through."""

    ADMIN = "admin", "Admin"
    CLI = "cli", "CLI"
    API = "api", "API"
    TASK = "task", "Task"


CONVENTION_CHOICES = [(c.name, c.label) for c in engine.CONVENTIONS.values()]


class FlagStage(models.TextChoices):
    """The runbook's emergency disable and its three-step progressive re-enable."""

    NORMAL = "normal", "Normal"
    DISABLED = "disabled", "Emergency-disabled"
    DRY_RUN = "dry_run", "Re-enable step 1 done: dry run"
    LIMITED = "limited", "Re-enable step 2 done: limited retries"


class Target(models.Model):
    """One application database the console operates on."""

    name = models.SlugField(max_length=100, unique=True)
    environment = models.CharField(max_length=20, choices=Environment.choices)
    # A secret: shown only masked, never logged, never returned by any door; stored encrypted
    # with TARGET_SECRET_KEY (fields.py), in the clear only on its way to the target.
    connection_url = EncryptedTextField(validators=[validate_target_url])
    convention = models.CharField(max_length=20, choices=CONVENTION_CHOICES)
    schema = models.CharField(
        max_length=63, blank=True, help_text="PostgreSQL schema holding the books (optional)."
    )
    lock_timeout_seconds = models.PositiveIntegerField(
        default=60,
        validators=[MinValueValidator(1), MaxValueValidator(86_400)],
        help_text="MIGRATION_LOCK_TIMEOUT: a lock held longer than this is stale.",
    )
    max_retries = models.PositiveSmallIntegerField(
        default=3,
        validators=[MaxValueValidator(10)],
        help_text="MIGRATION_MAX_RETRIES: more attempts to take the lock after the first.",
    )
    requires_approval = models.BooleanField(
        default=False,
        help_text="Two-person rule: operations that change this target wait until a different "
        "user approves them. On for production targets unless turned off.",
    )
    statement_timeout_seconds = models.PositiveIntegerField(
        default=300,
        validators=[MinValueValidator(1), MaxValueValidator(86_400)],
        help_text="Bound on each statement of a migration the console runs.",
    )
    health_url = models.URLField(
        blank=True,
        help_text="The application's health endpoint (HTTP 2xx means it responds); an "
        'incident\'s "Run checks" asks it for the API-endpoints item.',
    )
    # The runtime flags the application's auto-migrator obeys (with lock_timeout_seconds and
    # max_retries above). Changed only through services.change_flags and its kin, which keep
    # their history in FlagChange.
    auto_migrate = models.BooleanField(
        default=True, help_text="AUTO_MIGRATE: the application may apply migrations at start-up."
    )
    migration_dry_run = models.BooleanField(
        default=False, help_text="MIGRATION_DRY_RUN: the auto-migrator only previews."
    )
    cache_ttl_seconds = models.PositiveIntegerField(
        default=60,
        validators=[MinValueValidator(1), MaxValueValidator(86_400)],
        help_text="MIGRATION_CACHE_TTL: how long applications may keep the flags they read.",
    )
    emergency_bypass = models.BooleanField(
        default=False,
        help_text="EMERGENCY_BYPASS: the application skips all migration logic at start-up.",
    )
    flag_stage = models.CharField(
        max_length=20,
        choices=FlagStage.choices,
        default=FlagStage.NORMAL,
        help_text="Where the target is between an emergency disable and the full re-enable.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        permissions = [
            ("force_unlock_target", "Can force-release a target's migration lock"),
            ("import_scripts", "Can import a target's migration scripts"),
            ("dry_run_migrations", "Can dry-run migrations and rollbacks"),
            ("run_migrations", "Can apply and roll back migrations"),
            ("fix_books", "Can mark migrations applied or rolled back without running SQL"),
            ("verify_target", "Can verify a target's books against its scripts"),
            ("cleanup_target", "Can clean up a target's lock table"),
            ("change_flags", "Can change a target's runtime flags (kill switches)"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def masked_url(self) -> str:
        return engine.mask_url(self.connection_url)

    @property
    def dialect(self) -> str:
        return engine.dialect_of(self.connection_url)

    @property
    def is_production(self) -> bool:
        return self.environment == Environment.PRODUCTION

    @property
    def lock_timeout(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.lock_timeout_seconds)

    def clean(self) -> None:
        if self.schema and not SCHEMA_NAME.fullmatch(self.schema):
            # The engine quotes it anyway; a name like this is a typo or an attack.
            raise ValidationError(
                {
                    "schema": "A schema name is letters, digits, _, $ and -, "
                    "starting with a letter or _."
                }
            )
        if self.schema and self.connection_url and self.dialect == "sqlite":
            raise ValidationError({"schema": "A schema can only be set for PostgreSQL targets."})
        refused = self.health_url and health.refused_literal(
            self.health_url, settings.HEALTH_CHECK_ALLOWED_NETWORKS
        )
        if refused:
            raise ValidationError(
                {
                    "health_url": f"{refused} is a loopback, link-local or private address: "
                    "health checks do not go there unless HEALTH_CHECK_ALLOWED_NETWORKS "
                    "allows it."
                }
            )


# What a person sets on a target: the admin form, its audit record and registration use these.
# Not the runtime flags (FLAG_FIELDS): they change only through services.change_flags and its
# kin, so their history (FlagChange) is complete. Registration sets their initial values.
TARGET_SETTINGS = [
    "name",
    "environment",
    "convention",
    "connection_url",
    "schema",
    "statement_timeout_seconds",
    "requires_approval",
    "health_url",
]


class LockState(models.TextChoices):
    UNKNOWN = "unknown", "Unknown"
    FREE = "free", "Free"
    HELD = "held", "Held"
    STALE = "stale", "Stale"


class LockObservation(models.Model):
    """The last lock state the console read from a target, kept so pages need no connection.

    Tools such as Knex store no time with their lock; ``first_seen_held_at`` is then the only
    clue to its age, which is why every status read updates this row.
    """

    target = models.OneToOneField(
        Target, on_delete=models.CASCADE, primary_key=True, related_name="lock_observation"
    )
    held = models.BooleanField(null=True, help_text="None until the first successful read.")
    holder = models.TextField(blank=True)
    rows = models.JSONField(default=list, blank=True)
    locked_at = models.DateTimeField(null=True, blank=True, help_text="As stored by the target.")
    first_seen_held_at = models.DateTimeField(null=True, blank=True)
    observed_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True, help_text="Why the last read failed, if it did.")

    def __str__(self) -> str:
        return f"lock of {self.target_id}: {self.state(timezone.now(), self.target.lock_timeout)}"

    @property
    def since(self) -> dt.datetime | None:
        return (self.locked_at or self.first_seen_held_at) if self.held else None

    @property
    def since_source(self) -> str | None:
        """``"target"`` when the target stores the time; ``"first_seen"`` when the console
        only knows when it first saw the lock held."""
        if not self.held:
            return None
        return "target" if self.locked_at else "first_seen"

    def age(self, now: dt.datetime) -> dt.timedelta | None:
        since = self.since
        return max(now - since, dt.timedelta(0)) if since else None

    def state(self, now: dt.datetime, lock_timeout: dt.timedelta) -> str:
        """Free, held or stale. A lock whose age is only known from when it was first seen is
        stale once even that lower bound passes the lock timeout."""
        if self.held is None:
            return LockState.UNKNOWN
        if not self.held:
            return LockState.FREE
        age = self.age(now)
        return LockState.STALE if age is not None and age > lock_timeout else LockState.HELD


class MigrationScript(models.Model):
    """The SQL of one migration as imported from the application's migrations folder, kept
    with its checksum so the console knows exactly which SQL it ran."""

    target = models.ForeignKey(Target, on_delete=models.CASCADE, related_name="scripts")
    version = models.CharField(max_length=engine.MAX_VERSION_DIGITS)  # what the engine reads
    name = models.CharField(max_length=255)
    filename = models.CharField(max_length=255)
    layout = models.CharField(max_length=10)
    up_sql = models.TextField()
    down_sql = models.TextField(blank=True)
    # [{"sql": ..., "line": ...}]: the statements as split at import, with their file lines.
    up_statements = models.JSONField(default=list)
    down_statements = models.JSONField(default=list)
    transactional = models.BooleanField(default=True)
    needs_no_transaction = models.JSONField(default=list, blank=True)
    checksum = models.CharField(max_length=64)
    imported_at = models.DateTimeField(default=timezone.now)
    # A re-import found different SQL for this migration while it was applied: kept apart.
    drift_checksum = models.CharField(max_length=64, blank=True)
    drift_detected_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["target", "version"]
        constraints = [
            models.UniqueConstraint(fields=["target", "version"], name="one_script_per_version")
        ]

    def __str__(self) -> str:
        return f"{self.target.name}: {self.filename}"


class OperationKind(models.TextChoices):
    FORCE_UNLOCK = "force_unlock", "Force-release migration lock"
    APPLY = "apply", "Apply migrations"
    ROLLBACK = "rollback", "Roll back a migration"
    MARK_APPLIED = "mark_applied", "Mark applied (books only)"
    MARK_ROLLED_BACK = "mark_rolled_back", "Mark rolled back (books only)"
    VERIFY = "verify", "Verify"
    CLEANUP = "cleanup", "Clean up the lock table"


class OperationStatus(models.TextChoices):
    AWAITING_APPROVAL = "awaiting_approval", "Awaiting approval"
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    LOST = "lost", "Lost"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_STATUSES = (
    OperationStatus.AWAITING_APPROVAL,
    OperationStatus.QUEUED,
    OperationStatus.RUNNING,
)


class Operation(models.Model):
    """One audited request to act on a target. Written before its task is sent (an outbox)."""

    kind = models.CharField(max_length=30, choices=OperationKind.choices)
    target = models.ForeignKey(Target, on_delete=models.PROTECT, related_name="operations")
    status = models.CharField(
        max_length=20, choices=OperationStatus.choices, default=OperationStatus.QUEUED
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    requested_by_name = models.CharField(max_length=150)
    door = models.CharField(max_length=10, choices=Door.choices)
    reason = models.TextField()
    # The incident this operation serves, when there is one: it lands on that incident's
    # timeline even when its target is not among the affected ones.
    incident = models.ForeignKey(
        "incidents.Incident",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="operations",
    )
    params = models.JSONField(default=dict, blank=True)
    requested_at = models.DateTimeField(default=timezone.now)  # indexed with id (Meta.indexes)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    approved_by_name = models.CharField(max_length=150, blank=True)
    # When an approval (or a rejection, or the request's expiry) was decided, and why.
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_reason = models.TextField(blank=True)
    log = models.TextField(blank=True)
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-requested_at", "-id"]
        constraints = [
            # One mutating operation per target at a time, whichever door it came through.
            models.UniqueConstraint(
                fields=["target"],
                condition=Q(status__in=ACTIVE_STATUSES) & ~Q(kind="verify"),
                name="one_active_operation_per_target",
            )
        ]
        indexes = [
            models.Index(fields=["status", "requested_at"]),
            # The history changelist (admin/history.py): its ordering, and each of its filters and
            # searched columns followed by the time, so a filtered page is read in order.
            models.Index(fields=["requested_at", "id"]),
            models.Index(fields=["kind", "requested_at"]),
            models.Index(fields=["door", "requested_at"]),
            models.Index(fields=["target", "requested_at"]),
            models.Index(fields=["requested_by_name", "requested_at"]),
        ]
        permissions = [("approve_operation", "Can approve or reject operations (two-person rule)")]

    # Not a field: the target's lock as a run left it, recorded as its lock observation in
    # the transaction that ends the operation (services._finish), not in a commit of its own.
    lock_after = None

    def __str__(self) -> str:
        return f"#{self.pk} {self.get_kind_display()} on {self.target.name} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status not in ACTIVE_STATUSES

    @property
    def duration(self) -> dt.timedelta | None:
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None


class AuditEvent(AppendOnlyModel):
    """Who did what, through which door, when. Append-only: the model refuses to update or
    delete a row, and on PostgreSQL a trigger makes the database refuse too.

    References are kept without database constraints and with copies of the names, so the
    history survives a deleted user and is never rewritten by a cascade.
    """

    created_at = models.DateTimeField(default=timezone.now)  # indexed with id (Meta.indexes)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    actor_name = models.CharField(max_length=150)
    door = models.CharField(max_length=10, choices=Door.choices)
    action = models.CharField(max_length=60)  # indexed with created_at (Meta.indexes)
    target = models.ForeignKey(
        Target,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    target_name = models.CharField(max_length=100, blank=True)
    operation = models.ForeignKey(
        Operation,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="audit_events",
    )
    details = models.JSONField(default=dict, blank=True)
    # Where the request came from (opsconsole.middleware); empty for the CLI, a task's id for
    # a task.
    ip = models.GenericIPAddressField(null=True, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    # Row-level history: the object a change is about ("incidents.incident", 7) and its
    # changed fields as they were and became. The console's own events rather than a history
    # library: every change already goes through a service that writes an audit event, so the
    # row history is that event, with the same who / door / ip / request id and the same hash
    # chain, in one place for auditors, instead of a second, unchained copy kept by triggers.
    object_model = models.CharField(max_length=60, blank=True)
    object_id = models.BigIntegerField(null=True, blank=True)
    before = models.JSONField(default=dict, blank=True)
    after = models.JSONField(default=dict, blank=True)
    # Tamper evidence (migrations_ops.audit_chain): each row's hash covers its content and the
    # previous row's hash, in id order; ``ops audit-verify`` walks the chain.
    previous_hash = models.CharField(max_length=64, blank=True)
    hash = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # The history changelist (admin/history.py): its ordering, and each of its filters and
            # searched columns followed by the time, so a filtered page is read in order.
            models.Index(fields=["created_at", "id"]),
            models.Index(fields=["door", "created_at"]),
            models.Index(fields=["action", "created_at"]),
            models.Index(fields=["target_name", "created_at"]),
            models.Index(fields=["actor_name", "created_at"]),
            # An object's History page.
            models.Index(fields=["object_model", "object_id", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_name} {self.action}"


class AlertThresholds(models.Model):
    """The runbook's alert thresholds the fleet view applies: one row, edited by console
    admins; until it exists the ``ALERT_*`` settings stand."""

    lock_held_seconds = models.PositiveIntegerField(
        validators=[MinValueValidator(1)],
        help_text="A lock held longer than this is critical (runbook: 30 s).",
    )
    failure_rate = models.FloatField(
        validators=[MinValueValidator(0), MaxValueValidator(1)],
        help_text="Share of the last 24 h's migrations that failed above which a target is "
        "critical (runbook: 0.10).",
    )
    retry_rate = models.FloatField(
        validators=[MinValueValidator(0), MaxValueValidator(1)],
        help_text="Share that retried for the lock above which a target is a warning "
        "(runbook: 0.50).",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "alert thresholds"
        verbose_name_plural = "alert thresholds"
        constraints = [models.CheckConstraint(condition=Q(id=1), name="one_row_of_thresholds")]

    def __str__(self) -> str:
        return (
            f"lock > {self.lock_held_seconds} s, failures > {self.failure_rate:.0%}, "
            f"retries > {self.retry_rate:.0%}"
        )


# The runbook's names for the flags, and the Target field behind each (every door uses these).
FLAG_FIELDS = {
    "AUTO_MIGRATE": "auto_migrate",
    "MIGRATION_DRY_RUN": "migration_dry_run",
    "MIGRATION_MAX_RETRIES": "max_retries",
    "MIGRATION_LOCK_TIMEOUT": "lock_timeout_seconds",
    "MIGRATION_CACHE_TTL": "cache_ttl_seconds",
    "EMERGENCY_BYPASS": "emergency_bypass",
}


class FlagChangeKind(models.TextChoices):
    SET = "set", "Set"
    EMERGENCY_DISABLE = "emergency_disable", "Emergency disable"
    REENABLE_DRY_RUN = "reenable_1", "Re-enable step 1: dry run"
    REENABLE_LIMITED = "reenable_2", "Re-enable step 2: limited retries"
    REENABLE_FULL = "reenable_3", "Re-enable step 3: full"
    DRILL = "drill", "Drill"


class FlagChange(AppendOnlyModel):
    """One change of a target's flags: who, when, why, through which door, old -> new.
    Append-only like AuditEvent (a PostgreSQL trigger refuses UPDATE and DELETE)."""

    target = models.ForeignKey(Target, on_delete=models.PROTECT, related_name="flag_changes")
    changed_at = models.DateTimeField(default=timezone.now)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    actor_name = models.CharField(max_length=150)
    door = models.CharField(max_length=10, choices=Door.choices)
    kind = models.CharField(max_length=20, choices=FlagChangeKind.choices)
    reason = models.TextField()
    # {"AUTO_MIGRATE": true, ...}: only the flags this change touched, by their runbook names.
    before = models.JSONField(default=dict)
    after = models.JSONField(default=dict)
    stage_before = models.CharField(max_length=20, choices=FlagStage.choices)
    stage_after = models.CharField(max_length=20, choices=FlagStage.choices)

    class Meta:
        ordering = ["-changed_at", "-id"]
        indexes = [models.Index(fields=["target", "changed_at", "id"])]

    def __str__(self) -> str:
        return f"{self.changed_at:%Y-%m-%d %H:%M:%S} {self.actor_name} {self.kind} {self.target}"


class ApiToken(models.Model):
    """A read-only credential for one application: ``Authorization: Bearer <token>``. Only a
    SHA-256 of the token is kept (the token itself is shown once, when it is made); it reads
    only the targets it is scoped to."""

    name = models.CharField(max_length=100, help_text="The application using it.")
    prefix = models.CharField(max_length=16, unique=True, help_text="Identifies the token in logs.")
    token_hash = models.CharField(max_length=64, unique=True)
    targets = models.ManyToManyField(Target, related_name="api_tokens")
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_by_name = models.CharField(max_length=150)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by_name = models.CharField(max_length=150, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name", "-created_at"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class WorkerHeartbeat(models.Model):
    """A Celery worker's sign of life, one row per worker name: written when the worker is
    ready and every WORKER_HEARTBEAT_SECONDS from a thread of its main process (so a long
    operation on a solo pool does not silence it), and marked stopped when it shuts down. The
    console reads it to say when no worker has been seen within WORKER_SEEN_WITHIN seconds:
    then nothing runs the operations it queues. Bookkeeping only: no admin page, no
    permissions."""

    hostname = models.CharField(max_length=255, unique=True)
    # The queues it consumes: only a worker of the console's task queue runs its operations.
    queues = models.JSONField(default=list)
    pid = models.PositiveIntegerField(null=True)
    started_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-last_seen_at"]
        default_permissions = ()

    def __str__(self) -> str:
        return self.hostname
