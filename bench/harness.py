"""What the benchmarks under bench/ share: scratch PostgreSQL databases, a real Celery worker
process, Redis clean-up and percentiles. Imports nothing from tests/ and nothing from Django, so
it can be used before ``django.setup()``."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
PG_SERVER = os.environ.get("BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
REDIS_SERVER = os.environ.get("BENCH_REDIS_SERVER", "redis://127.0.0.1:6379")


# --- PostgreSQL --------------------------------------------------------------------------------
DROP_DATABASE = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")


def create_pg_database(name: str) -> str:
    """Drop ``name`` if it exists, create it empty, and return its URL."""
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(DROP_DATABASE.format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{PG_SERVER}/{name}"


def drop_pg_database(name: str) -> None:
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(DROP_DATABASE.format(sql.Identifier(name)))


# --- Redis -------------------------------------------------------------------------------------
def delete_queue_keys(redis_url: str, queue: str) -> None:
    """Remove what kombu keeps in Redis for one queue (the list and its binding sets). The
    shared ``_kombu.binding_deadlines`` set expires its members by itself."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    finally:
        client.close()


# --- the Celery worker -------------------------------------------------------------------------
@contextlib.contextmanager
def celery_worker(
    *,
    env: dict[str, str],
    queue: str,
    log_path: Path,
    entry: Sequence[str] = ("-m", "celery"),
    loglevel: str = "INFO",
    startup_timeout: float = 30,
) -> Iterator[subprocess.Popen]:
    """Start ``celery -A opsconsole worker`` (solo pool) with ``env`` added to this process's
    environment; yield once it is ready, stop it afterwards (also on errors and Ctrl-C).

    The worker gets a session of its own, so a Ctrl-C in the terminal reaches only this process,
    which then stops the worker in order."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                *entry,
                "-A",
                "opsconsole",
                "worker",
                "--pool",
                "solo",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                loglevel,
                "--queues",
                queue,
                "--hostname",
                f"bench-{queue}@%h",
            ],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + startup_timeout
        while "ready." not in log_path.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Celery worker did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield process
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen, timeout: float = 15) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind the stack like Ctrl-C does, so every ``finally`` clean-up runs."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- statistics --------------------------------------------------------------------------------
def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``fraction`` of the values
    at or below it (so p99 of 200 runs is the 198th smallest, never an interpolation)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 0.50),
        "p90": percentile(values, 0.90),
        "p99": percentile(values, 0.99),
        "max": max(values),
    }
