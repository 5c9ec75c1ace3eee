"""``GET /metrics``: the console's figures in Prometheus's text format.

Every scrape reads the console's database (``selectors.metrics_snapshot``) through a collector
registered for that request alone, so all web workers answer alike: nothing is counted in
process memory. Series are named ``opsconsole_*``; docs/alerts.md lists them with the alert
rules built on them.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from django.http import HttpResponse
from django.utils import timezone
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from migrations_ops import selectors
from migrations_ops.api import allow, api_reader
from migrations_ops.models import FlagStage, OperationKind, OperationStatus

# Always exposed for every target, at 0 until they happen: Prometheus's increase() cannot see
# the first failure of a series that only appears with it.
ZERO_SERIES_KINDS = (OperationKind.APPLY, OperationKind.ROLLBACK)
ZERO_SERIES_STATUSES = (OperationStatus.SUCCEEDED, OperationStatus.FAILED, OperationStatus.LOST)


class ConsoleCollector:
    """Reads the console's database when Prometheus scrapes; ``target_ids`` None means all."""

    def __init__(self, target_ids: frozenset[int] | None = None):
        self.target_ids = target_ids

    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        snapshot = selectors.metrics_snapshot(self.target_ids, now)
        names = {target.pk: target.name for target in snapshot.targets}
        yield from target_families(snapshot, now)
        yield from operation_families(snapshot, names)
        yield duration_family(snapshot, names)
        incidents = GaugeMetricFamily(
            "opsconsole_open_incidents",
            "Open incidents (detected, mitigating or monitoring) by severity; drills left out.",
            labels=["severity"],
        )
        for severity, count in snapshot.open_incidents.items():
            incidents.add_metric([severity], count)
        yield incidents
        yield from worker_families(selectors.worker_liveness(now))


def worker_families(liveness: selectors.WorkerLiveness) -> Iterator[Metric]:
    """The console's workers, console-wide (no target in them). Absent with tasks run
    in-process: there is no worker to miss."""
    if liveness.in_process:
        return
    alive = GaugeMetricFamily(
        "opsconsole_workers_alive",
        "Workers of the console's task queue seen alive within WORKER_SEEN_WITHIN seconds "
        "(0: nothing runs the operations it queues).",
    )
    alive.add_metric([], len(liveness.alive))
    yield alive
    if liveness.last_seen_seconds is not None:
        last_seen = GaugeMetricFamily(
            "opsconsole_worker_last_seen_seconds",
            "Seconds since a worker of the console's task queue was last seen alive (absent if "
            "none ever was).",
        )
        last_seen.add_metric([], liveness.last_seen_seconds)
        yield last_seen


def target_families(snapshot: selectors.MetricsSnapshot, now: dt.datetime) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "opsconsole_target_info",
        "Each target the console knows (always 1).",
        labels=["target", "environment"],
    )
    held = GaugeMetricFamily(
        "opsconsole_lock_held_seconds",
        "How long the migration lock has been held, from the last lock observation (0 when free; "
        "absent while the lock state is unknown).",
        labels=["target"],
    )
    observation_age = GaugeMetricFamily(
        "opsconsole_lock_observation_age_seconds",
        "Seconds since the console last read the target's lock (absent if never read).",
        labels=["target"],
    )
    read_failed = GaugeMetricFamily(
        "opsconsole_lock_read_failed",
        "1 when the last read of the target's lock failed or it was never read, else 0.",
        labels=["target"],
    )
    scripts = GaugeMetricFamily(
        "opsconsole_migration_scripts",
        "Migration scripts imported into the console for the target.",
        labels=["target"],
    )
    pending = GaugeMetricFamily(
        "opsconsole_pending_migrations",
        "Migrations the last successful verify found pending (absent until a verify ran).",
        labels=["target"],
    )
    for row in snapshot.fleet:
        target = [row["name"]]
        info.add_metric([row["name"], row["environment"]], 1)
        lock = row["lock"]
        if lock["held"] is not None:
            held.add_metric(target, (lock["age_seconds"] or 0) if lock["held"] else 0)
        if row["observed_at"] is not None:
            observation_age.add_metric(target, (now - row["observed_at"]).total_seconds())
        read_failed.add_metric(target, 1 if lock["error"] else 0)
        scripts.add_metric(target, row["scripts"])
        if row["pending"] is not None:
            pending.add_metric(target, row["pending"])
    flags = GaugeMetricFamily(
        "opsconsole_flag",
        "The runtime flags applications obey, by their runbook names (booleans as 0/1; "
        "MIGRATION_LOCK_TIMEOUT and MIGRATION_CACHE_TTL in seconds).",
        labels=["target", "flag"],
    )
    stage = GaugeMetricFamily(
        "opsconsole_flag_stage",
        "1 for the target's current flag stage (normal, disabled, or a re-enable step), else 0.",
        labels=["target", "stage"],
    )
    for target in snapshot.targets:
        for flag, value in selectors.flags_of(target).items():
            flags.add_metric([target.name, flag], int(value))
        for choice in FlagStage.values:
            stage.add_metric([target.name, choice], 1 if target.flag_stage == choice else 0)
    yield from (info, held, observation_age, read_failed, scripts, pending, flags, stage)


def operation_families(
    snapshot: selectors.MetricsSnapshot, names: dict[int, str]
) -> Iterator[Metric]:
    finished = CounterMetricFamily(
        "opsconsole_operations_finished",
        "Operations that ended, by kind and final status (dry_run: an apply or rollback preview).",
        labels=["target", "kind", "status", "dry_run"],
    )
    retried = CounterMetricFamily(
        "opsconsole_operations_lock_retried",
        "Operations that ended after more than one attempt at the migration lock.",
        labels=["target", "kind", "dry_run"],
    )
    counts: dict[tuple[str, ...], int] = {
        (name, kind, status, "false"): 0
        for name in names.values()
        for kind in ZERO_SERIES_KINDS
        for status in ZERO_SERIES_STATUSES
    }
    retries: dict[tuple[str, ...], int] = defaultdict(int)
    for name in names.values():
        for kind in ZERO_SERIES_KINDS:
            retries[(name, kind, "false")] = 0
    for row in snapshot.final_operations:
        dry_run = "true" if row["dry_run"] else "false"
        name = names[row["target_id"]]
        counts[(name, row["kind"], row["status"], dry_run)] = row["count"]
        retries[(name, row["kind"], dry_run)] += row["retried"]
    for labels, count in sorted(counts.items()):
        finished.add_metric(list(labels), count)
    for labels, count in sorted(retries.items()):
        retried.add_metric(list(labels), count)
    active = GaugeMetricFamily(
        "opsconsole_operations_active",
        "Operations not ended yet: awaiting approval, queued or running.",
        labels=["target", "kind", "status"],
    )
    for row in snapshot.active_operations:
        active.add_metric([names[row["target_id"]], row["kind"], row["status"]], row["count"])
    yield from (finished, retried, active)


def duration_family(snapshot: selectors.MetricsSnapshot, names: dict[int, str]) -> Metric:
    histogram = HistogramMetricFamily(
        "opsconsole_operation_duration_seconds",
        "How long operations ran, from start to finish.",
        labels=["target", "kind"],
    )
    for row in snapshot.durations:
        histogram.add_metric(
            [names[row["target_id"]], row["kind"]],
            buckets=histogram_buckets(row),
            sum_value=row["total"].total_seconds() if row["total"] is not None else 0.0,
        )
    return histogram


def histogram_buckets(row: dict[str, Any]) -> list[tuple[str, int]]:
    """Cumulative ``(le, count)`` pairs, as the database counted them, ending with +Inf."""
    bounds = enumerate(selectors.DURATION_BUCKETS)
    return [*((str(float(bound)), row[f"le_{i}"]) for i, bound in bounds), ("+Inf", row["count"])]


@allow("GET")
@api_reader("migrations_ops.view_target")
def metrics(request):
    """Prometheus scrapes this; a token's scrape covers only the token's targets."""
    token = request.api_token
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConsoleCollector(token.target_ids if token is not None else None))
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(registry), content_type=content_type)
