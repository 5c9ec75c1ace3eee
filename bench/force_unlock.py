"""How long a force-unlock takes, end to end, through a real Celery worker.

    .venv/bin/python bench/force_unlock.py [--runs N] [--warmup N] [--phases]
                                           [--poll-interval-ms MS] [--raw FILE] [--check]
    make bench                             (the defaults: 200 runs, 5 warm-up)

Builds everything it needs on the local PostgreSQL and Redis and removes it at the end (also
on Ctrl-C and errors): a console database, a runbook-convention target database registered as
a staging Target, a Redis queue of its own and a solo-pool worker process.

Each run takes a stale lock on the target (a row locked 20 minutes ago), then times from just
before ``services.request_force_unlock(...)`` until the row is gone from the target, watched
by a tight poll on a kept connection; the next run starts once the Operation has succeeded.
The baseline is the bare ``DELETE FROM migration_lock`` on an open connection.

It measures the code as it is, configured as deployed (settings from the environment, DEBUG
off); this process stands in for the web process, so it freezes its start-up objects out of the
garbage collector's reach as opsconsole/wsgi.py does.

``--phases`` also stamps each step, in this process and in the worker, and prints where the
end-to-end time goes (see bench/phases.py).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import harness  # noqa: E402 (needs the path above)
import psycopg  # noqa: E402

TARGET_P50_MS = 15.0
TARGET_P99_MS = 50.0
RUN_TIMEOUT = 30.0  # seconds a run may take before the bench gives up
REDIS_DB = 14

WIDTH = 68  # of the label column

TARGET_SQL = [
    *harness.RUNBOOK_BOOKS,
    "INSERT INTO migrations (filename, applied_at) VALUES "
    "('001_create_users.sql', now() - interval '2 days'), "
    "('002_add_email.sql', now() - interval '1 day')",
]
TAKE_STALE_LOCK = (
    "INSERT INTO migration_lock (id, locked_by, locked_at) "
    "VALUES (1, %s, now() - interval '20 minutes')"
)
COUNT_LOCK_ROWS = "SELECT count(*) FROM migration_lock"
BARE_RELEASE = "DELETE FROM migration_lock"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="timed runs of each (default 200)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed force-unlocks first, so one-off costs (first broker connection, the "
        "worker's first task) are not counted (default 5)",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="stamp every step in this process and the worker and print the breakdown",
    )
    parser.add_argument(
        "--poll-interval-ms",
        type=float,
        default=0.2,
        help="sleep between two polls of the target's lock table (default 0.2); a tight poll "
        "takes CPU from the worker on a small machine, a loose one adds up to its interval",
    )
    parser.add_argument("--raw", type=Path, help="also write every run's figures to this JSON file")
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when the target is not met"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.poll_interval_ms < 0:
        parser.error("--runs must be at least 1, --warmup and --poll-interval-ms at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suffix = os.getpid()
    queue = f"opsconsole-bench-{suffix}"
    redis_url = f"{harness.REDIS_SERVER}/{REDIS_DB}"
    workdir = Path(tempfile.mkdtemp(prefix="opsconsole-bench-"))

    def bench(console_url: str, target_url: str) -> bool:
        env = harness.configure_console(console_url, redis_url=redis_url, queue=queue)
        return run(args, env, target_url, queue, workdir)

    status = None
    try:
        status = harness.run_with_databases(
            [f"opsconsole_bench_{suffix}", f"opsconsole_bench_target_{suffix}"],
            bench,
            check=args.check,
            redis_url=redis_url,
            queue=queue,
        )
        return status
    finally:
        if status is not None and status != harness.INTERRUPTED:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"(the worker's log is kept in {workdir})", file=sys.stderr)


def run(
    args: argparse.Namespace, env: dict[str, str], target_url: str, queue: str, workdir: Path
) -> bool:
    """Set up the console and the worker, time the runs, print the figures; True when the
    target was met."""
    services, operator, target = harness.set_up_console(target_url, "bench-target", TARGET_SQL)

    recorder = None
    worker_env = dict(env)
    entry: tuple[str, ...] = ("-m", "celery")
    phases_file = workdir / "worker-phases.jsonl"
    if args.phases:
        import phases

        recorder = phases.install_request_side()
        worker_env["BENCH_PHASES_FILE"] = str(phases_file)
        entry = (str(BENCH_DIR / "worker_main.py"),)
    # As opsconsole/wsgi.py does in the web process, which this process stands in for.
    gc.freeze()

    log_path = workdir / "worker.log"
    print(f"worker: celery solo pool on queue {queue} (log: {log_path})", file=sys.stderr)
    with (
        harness.celery_worker(env=worker_env, queue=queue, log_path=log_path, entry=entry),
        psycopg.connect(target_url, autocommit=True) as writer,
        psycopg.connect(target_url, autocommit=True) as poller,
    ):
        gc_pauses = GcPauses()
        bench = ForceUnlockBench(
            services,
            operator,
            target,
            writer,
            poller,
            recorder,
            poll_sleep=args.poll_interval_ms / 1000,
            gc_pauses=gc_pauses,
        )
        load_before = os.getloadavg()[0]
        for index in range(args.warmup):
            bench.force_unlock_once(f"warm-up {index}")
        end_to_end = []
        phase_runs = []
        for index in range(args.runs):
            result = bench.force_unlock_once(f"run {index}")
            end_to_end.append(result)
            if args.phases:
                worker = phases.read_worker_record(phases_file, result["operation"])
                chain, after = phases.phases_of(result["stamps"], result["request"], worker)
                phase_runs.append((chain, after, result["request"], worker))
        bare = [bench.bare_delete_once(index) for index in range(args.runs)]
        gc_pauses.stop()

    report(args, end_to_end, bare, load_before)
    if args.raw:
        write_raw(args.raw, end_to_end, bare, phase_runs)
    if args.phases:
        report_phases(phase_runs)
    return meets_target([r["gone"] for r in end_to_end])


class GcPauses:
    """Garbage-collector pauses in this process (a full collection after Django's start-up
    and ``migrate`` can take tens of milliseconds and land inside a timed run)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._started: float | None = None
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))
            self._started = None

    def reset(self) -> None:
        self.pauses.clear()

    def stop(self) -> None:
        gc.callbacks.remove(self._callback)


class ForceUnlockBench:
    def __init__(
        self, services, operator, target, writer, poller, recorder, *, poll_sleep, gc_pauses
    ):
        from migrations_ops.models import ACTIVE_STATUSES, Operation, OperationStatus

        self.services = services
        self.operator = operator
        self.target = target
        self.writer = writer
        self.poll_cursor = poller.cursor()
        self.recorder = recorder
        self.poll_sleep = poll_sleep
        self.gc_pauses = gc_pauses
        self.Operation = Operation
        self.active = set(ACTIVE_STATUSES)
        self.succeeded = OperationStatus.SUCCEEDED

    def lock_rows(self) -> int:
        self.poll_cursor.execute(COUNT_LOCK_ROWS)
        return self.poll_cursor.fetchone()[0]

    def force_unlock_once(self, label: str) -> dict:
        self.writer.execute(TAKE_STALE_LOCK, (f"bench {label}",))
        if self.recorder is not None:
            self.recorder.reset()
        self.gc_pauses.reset()
        start = time.perf_counter()
        operation = self.services.request_force_unlock(
            actor=self.operator, target=self.target, reason=f"bench {label}"
        )
        returned = time.perf_counter()
        while self.lock_rows():
            if time.perf_counter() - start > RUN_TIMEOUT:
                raise RuntimeError(f"{label}: the lock is still held after {RUN_TIMEOUT} s")
            time.sleep(self.poll_sleep)
        gone = time.perf_counter()
        gc_in_run = list(self.gc_pauses.pauses)
        request = self.recorder.snapshot() if self.recorder is not None else None
        status = self.wait_until_finished(operation.pk, start, label)
        done = time.perf_counter()
        if status != self.succeeded:
            error = self.Operation.objects.values_list("error", flat=True).get(pk=operation.pk)
            raise RuntimeError(f"{label}: operation #{operation.pk} {status}: {error}")
        return {
            "operation": operation.pk,
            "returned": returned - start,
            "gc": gc_in_run,
            "gone": gone - start,
            "done": done - start,
            "stamps": {"start": start, "gone": gone, "done": done},
            "request": request,
        }

    def wait_until_finished(self, operation_id: int, start: float, label: str) -> str:
        rows = self.Operation.objects.filter(pk=operation_id).values_list("status", flat=True)
        while (status := rows.get()) in self.active:
            if time.perf_counter() - start > RUN_TIMEOUT:
                raise RuntimeError(f"{label}: operation #{operation_id} still {status}")
            time.sleep(0.0005)
        return status

    def bare_delete_once(self, index: int) -> float:
        self.writer.execute(TAKE_STALE_LOCK, (f"bench bare {index}",))
        start = time.perf_counter()
        self.writer.execute(BARE_RELEASE)
        elapsed = time.perf_counter() - start
        if self.lock_rows():
            raise RuntimeError("the bare DELETE left a lock row behind")
        return elapsed


# --- output ------------------------------------------------------------------------------------
row = functools.partial(harness.row, width=WIDTH)
header = functools.partial(harness.header, width=WIDTH)


def meets_target(gone: list[float]) -> bool:
    s = harness.summary(gone)
    return s["p50"] * 1000 <= TARGET_P50_MS and s["p99"] * 1000 <= TARGET_P99_MS


def report(args, end_to_end: list[dict], bare: list[float], load_before: float) -> None:
    from django.conf import settings

    gone = [r["gone"] for r in end_to_end]
    print()
    print(
        f"force-unlock, {args.runs} runs (+{args.warmup} warm-up), PostgreSQL target, "
        f"Celery solo worker on Redis{', phase stamps on' if args.phases else ''}"
    )
    print(f"poll: every {args.poll_interval_ms:g} ms on a kept autocommit connection")
    print(harness.machine_line(load_before, os.getloadavg()[0], "runs"))
    print(
        f"settings: TARGET_KEEP_CONNECTIONS={settings.TARGET_KEEP_CONNECTIONS}, "
        f"console CONN_MAX_AGE={settings.DATABASES['default']['CONN_MAX_AGE']}, "
        f"CELERY_DB_REUSE_MAX={settings.CELERY_DB_REUSE_MAX}"
    )
    print(header(""))
    print(row("end to end: request -> lock row gone", gone))
    print(row("  request_force_unlock() returned", [r["returned"] for r in end_to_end]))
    print(row("  Operation seen succeeded", [r["done"] for r in end_to_end]))
    print(row("bare DELETE FROM migration_lock", bare))
    collections = [pause for r in end_to_end for pause in r["gc"]]
    full = [seconds for generation, seconds in collections if generation == 2]
    print(
        f"garbage collections inside timed runs (this process): {len(collections)}, "
        f"{len(full)} full" + (f", longest full {max(full) * 1000:.1f} ms" if full else "")
    )
    s = harness.summary(gone)
    met = meets_target(gone)
    print(
        f"target: p50 <= {TARGET_P50_MS:g} ms, p99 <= {TARGET_P99_MS:g} ms -> "
        f"{'MET' if met else 'NOT MET'} (p50 {s['p50'] * 1000:.2f} ms, "
        f"p99 {s['p99'] * 1000:.2f} ms); all {len(end_to_end)} operations succeeded"
    )


def write_raw(path: Path, end_to_end: list[dict], bare: list[float], phase_runs: list) -> None:
    runs = [
        {key: result[key] for key in ("operation", "returned", "gone", "done", "gc")}
        | ({"phases": dict(phase_runs[index][0] + phase_runs[index][1])} if phase_runs else {})
        for index, result in enumerate(end_to_end)
    ]
    path.write_text(json.dumps({"end_to_end": runs, "bare_delete": bare}, indent=1))


def report_phases(phase_runs: list[tuple]) -> None:
    chain_labels = [label for label, _ in phase_runs[0][0]]
    after_labels = [label for label, _ in phase_runs[0][1]]
    total = statistics.fmean(sum(seconds for _, seconds in run[0]) for run in phase_runs)
    print()
    print(header("where the end-to-end time goes") + "   mean  share")
    for position, label in enumerate(chain_labels):
        values = [run[0][position][1] for run in phase_runs]
        mean = statistics.fmean(values)
        print(f"{row(label, values)}{harness.ms(mean)}  {mean / total:5.1%}")
    print(header("after the lock is gone (not in end to end)"))
    for position, label in enumerate(after_labels):
        print(row(label, [run[1][position][1] for run in phase_runs]))
    print(header("inside the phases above"))
    sides = (("request", 2), ("worker", 3))
    for kind in ("console", "target"):
        for side, position in sides:
            durations = [
                run[position]["durations"].get(f"{kind}_connect", 0.0) for run in phase_runs
            ]
            print(row(f"{side}: new {kind} DB connection(s)", durations))
    for side, position in sides:
        counts = phase_runs[0][position]["counts"]
        connects = {
            kind: sum(run[position]["counts"].get(f"{kind}_connect", 0) for run in phase_runs)
            for kind in ("console", "target")
        }
        print(
            f"{side}: {counts.get('console_queries', 0)} console queries, "
            f"{counts.get('target_statements', 0)} target statements, "
            f"{counts.get('target_resets', 0)} kept target connection resets per operation; "
            f"{connects['console']} console and {connects['target']} target connects "
            f"in {len(phase_runs)} runs"
        )


if __name__ == "__main__":
    sys.exit(main())
