"""A real Celery worker process, consuming from Redis and writing to the test database."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def database_url(db: dict) -> str:
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = f"{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
    return f"postgres://{user}{password}@{host}/{db['NAME']}"


def console_env(
    *, database_url: str, redis_url: str, queue: str, witness_path: Path, **more: str
) -> dict:
    """The environment of a worker or beat process on the test database and Redis, with its
    audit witness (not the checkout's data/ folder)."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "opsconsole.settings",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "CELERY_QUEUE": queue,
        "CELERY_TASK_ALWAYS_EAGER": "false",
        "TARGET_CONNECT_TIMEOUT": "3",
        "AUDIT_WITNESS_PATH": str(witness_path),
        **more,
    }


def wait_for_line(process: subprocess.Popen, log_path: Path, line: str, what: str) -> None:
    deadline = time.monotonic() + 30
    while line not in log_path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log_path.read_text()}")
        time.sleep(0.1)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def celery_worker(
    *,
    database_url: str,
    redis_url: str,
    queue: str,
    log_path: Path,
    hostname: str = "",
    witness_path: Path | None = None,
):
    """Start ``celery worker`` (solo pool) and yield once it is ready; stop it afterwards. It
    records that it is alive every second (WORKER_HEARTBEAT_SECONDS)."""
    env = console_env(
        database_url=database_url,
        redis_url=redis_url,
        queue=queue,
        witness_path=witness_path or log_path.parent / "audit-witness.json",
        WORKER_HEARTBEAT_SECONDS="1",
    )
    with running_celery(
        [
            "worker",
            *("--pool", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat"),
            *("--loglevel", "INFO", "--queues", queue),
            *("--hostname", hostname or f"test-{queue}@%h"),
        ],
        env=env,
        log_path=log_path,
        ready="ready.",
        what="the Celery worker",
    ) as process:
        yield process


@contextlib.contextmanager
def celery_beat(
    *,
    database_url: str,
    redis_url: str,
    queue: str,
    log_path: Path,
    witness_path: Path,
    every: int = 1,
):
    """Start ``celery beat`` as deployed (its scheduler from the settings), every schedule
    entry due each ``every`` seconds, and yield once it has started; stop it afterwards."""
    env = console_env(
        database_url=database_url,
        redis_url=redis_url,
        queue=queue,
        witness_path=witness_path,
        OPERATION_SWEEP_INTERVAL=str(every),
        LOCK_OBSERVE_INTERVAL=str(every),
    )
    with running_celery(
        ["beat", "--loglevel", "INFO", "--max-interval", str(every)],
        env=env,
        log_path=log_path,
        ready="beat: Starting...",
        what="Celery beat",
    ) as process:
        yield process


@contextlib.contextmanager
def running_celery(arguments: list[str], *, env: dict, log_path: Path, ready: str, what: str):
    """``celery -A opsconsole ARGUMENTS`` logging to ``log_path``, yielded once the log shows
    ``ready``; stopped afterwards."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "opsconsole", *arguments],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_line(process, log_path, ready, what)
        yield process
    finally:
        stop(process)
