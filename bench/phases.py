"""Phase timing for ``force_unlock.py --phases``: wraps a few functions of migrations_ops
(services and engine), in the bench process and in the worker, to stamp when each step starts
and ends and to count queries and connections.

Stamps are ``time.perf_counter()``, which on Linux is CLOCK_MONOTONIC: one clock for every
process on the machine, so the bench's and the worker's stamps can be put on one timeline.
Nothing here changes what the services do; each wrapper costs a few microseconds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Any


class Recorder:
    """Stamps of the operation under way in this process (one at a time: the bench runs one
    request at a time, and the solo worker one task at a time)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.events: dict[str, float] = {}
        self.durations: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def mark(self, name: str, at: float | None = None) -> None:
        self.events.setdefault(name, time.perf_counter() if at is None else at)

    def add(self, name: str, seconds: float) -> None:
        self.durations[name] = self.durations.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "events": dict(self.events),
            "durations": dict(self.durations),
            "counts": dict(self.counts),
        }


RECORDER = Recorder()


def _timed(function, name: str):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        RECORDER.mark(f"{name}.start")
        try:
            return function(*args, **kwargs)
        finally:
            RECORDER.mark(f"{name}.end")

    return wrapper


def _replace(name: str, wrapper) -> None:
    """Put ``wrapper`` in place of services' ``name`` in every module of services holding it
    (each module calls its own binding: the package's re-export and the importing modules')."""
    from harness import services_holding

    for module in services_holding(name):
        setattr(module, name, wrapper)


def _install_common() -> None:
    """Wrappers both sides share: target connections, target statements, console queries."""
    from django.db import connection
    from django.db.backends.base.base import BaseDatabaseWrapper

    from migrations_ops import engine, services
    from migrations_ops.engine import connection as engine_connection
    from migrations_ops.engine.connection import TargetConnection

    original_open_target = services.open_target

    @contextlib.contextmanager
    def open_target(target, **kwargs):
        RECORDER.mark("target_connect.start")
        with original_open_target(target, **kwargs) as target_connection:
            RECORDER.mark("target_connect.end")
            yield target_connection
            RECORDER.mark("target_work.end")
        RECORDER.mark("target_close.end")

    _replace("open_target", open_target)

    for method in ("fetch_dicts", "execute"):
        original = getattr(TargetConnection, method)

        def counting(self, *args, _original=original, **kwargs):
            RECORDER.count("target_statements")
            return _original(self, *args, **kwargs)

        setattr(TargetConnection, method, counting)

    original_transaction = TargetConnection.transaction

    def transaction(self):
        RECORDER.count("target_statements")  # BEGIN
        RECORDER.count("target_statements")  # COMMIT
        return original_transaction(self)

    TargetConnection.transaction = transaction

    # Both engine.connect and a ConnectionCache open PostgreSQL connections through
    # _connect_postgresql, and a cache resets a kept connection with _reset before lending it
    # (one round trip, which is also its liveness check).
    original_connect_postgresql = engine_connection._connect_postgresql

    def connect_postgresql(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original_connect_postgresql(*args, **kwargs)
        finally:
            RECORDER.add("target_connect", time.perf_counter() - start)

    engine_connection._connect_postgresql = connect_postgresql

    original_reset = engine_connection._reset

    def reset(target_connection):
        RECORDER.count("target_resets")
        return original_reset(target_connection)

    engine_connection._reset = reset

    original_connect = BaseDatabaseWrapper.connect

    def connect(self):
        start = time.perf_counter()
        try:
            return original_connect(self)
        finally:
            RECORDER.add("console_connect", time.perf_counter() - start)

    BaseDatabaseWrapper.connect = connect

    def count_queries(execute, sql, params, many, context):
        RECORDER.count("console_queries")
        return execute(sql, params, many, context)

    connection.execute_wrappers.append(count_queries)

    _replace("observe_lock", _timed(services.observe_lock, "observe"))
    engine.Convention.release_lock = _timed(engine.Convention.release_lock, "release")


def install_request_side() -> Recorder:
    """In the bench process, after ``django.setup()``."""
    from migrations_ops import services

    _install_common()
    _replace("read_target_status", _timed(services.read_target_status, "read"))
    _replace("_create_operation", _timed(services._create_operation, "create"))
    _replace("send_operation", _timed(services.send_operation, "send"))
    return RECORDER


def install_worker_side(path: Path) -> None:
    """In the worker, after ``django.setup()``: one JSON line per task, written to ``path``
    once the task has returned."""
    from celery import signals

    from migrations_ops import services

    _install_common()
    _replace("execute_operation", _timed(services.execute_operation, "execute"))
    _replace("_finish", _timed(services._finish, "finish"))
    out = open(path, "a")  # noqa: SIM115 (open for the worker's whole life)

    @signals.task_received.connect(weak=False)
    def received(**kwargs):
        RECORDER.reset()
        RECORDER.mark("received")

    @signals.task_prerun.connect(weak=False)
    def prerun(**kwargs):
        RECORDER.mark("prerun")

    @signals.task_postrun.connect(weak=False)
    def postrun(args=(), **kwargs):
        RECORDER.mark("postrun")
        record = {"operation": args[0] if args else None, **RECORDER.snapshot()}
        out.write(json.dumps(record) + "\n")
        out.flush()


def read_worker_record(path: Path, operation_id: int, timeout: float = 10) -> dict[str, Any]:
    """The worker's stamps of one operation (written just after the task returns; a line
    still being written is skipped until it is whole)."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            for line in reversed(path.read_text().splitlines(keepends=True)):
                if not line.endswith("\n"):
                    continue
                record = json.loads(line)
                if record["operation"] == operation_id:
                    return record
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker wrote no phase record for operation #{operation_id}")
        time.sleep(0.001)


# One contiguous chain from "request starts" to "the bench sees the lock gone": the phases sum
# to the end-to-end time exactly. (side, event) pairs; "bench" stamps come from the bench loop.
# "target connection": a kept one (reset before use) or, failing that, a new one.
CHAIN = [
    ("bench", "start", None),
    ("request", "target_connect.end", "request: permission check + target connection"),
    ("request", "target_close.end", "request: read lock (table check + SELECT), give back"),
    ("request", "observe.end", "request: observe_lock (one UPDATE)"),
    ("request", "send.start", "request: Operation + AuditEvent insert + commit"),
    ("request", "send.end", "request: broker send (kombu -> Redis)"),
    ("worker", "received", "broker -> worker has the message"),
    ("worker", "execute.start", "worker: message -> task body (Celery, task_prerun)"),
    ("worker", "target_connect.start", "worker: claim UPDATE + SELECT operation"),
    ("worker", "target_connect.end", "worker: target connection"),
    ("worker", "release.end", "worker: release txn (check, FOR UPDATE, DELETE, re-read, COMMIT)"),
    ("bench", "gone", "bench poll notices the lock is gone"),
]
AFTER = [
    ("worker", "release.end", None),
    ("worker", "target_close.end", "worker: give the target connection back"),
    ("worker", "observe.end", "worker: observe_lock (one UPDATE)"),
    ("worker", "finish.end", "worker: _finish (Operation update + AuditEvent, commit)"),
    ("worker", "postrun", "worker: task return -> postrun"),
]


def phases_of(bench: dict[str, float], request: dict[str, Any], worker: dict[str, Any]):
    """``[(label, seconds), ...]`` for one run: the CHAIN, then what follows the release."""
    stamps = {"bench": bench, "request": request["events"], "worker": worker["events"]}

    def walk(chain):
        out = []
        previous = None
        for side, event, label in chain:
            at = stamps[side][event]
            if previous is not None:
                out.append((label, at - previous))
            previous = at
        return out

    return walk(CHAIN), walk(AFTER)
