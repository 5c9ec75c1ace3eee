"""What the benchmarks under bench/ share: scratch PostgreSQL databases and their clean-up, the
console's environment and set-up, a real Celery worker process, Redis, percentiles and their
table rows. Imports nothing from tests/, and Django only inside the functions that set it up or
close its connections, so it can be used before ``django.setup()``."""

from __future__ import annotations

import atexit
import base64
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
PG_SERVER = os.environ.get("BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
REDIS_SERVER = os.environ.get("BENCH_REDIS_SERVER", "redis://127.0.0.1:6379")
INTERRUPTED = 130  # the exit status after Ctrl-C or SIGTERM


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


def run_with_databases(
    names: Sequence[str],
    body: Callable[..., bool],
    *,
    check: bool,
    redis_url: str | None = None,
    queue: str | None = None,
) -> int:
    """Create the databases ``names`` empty, call ``body`` with their URLs (it returns whether
    the target was met) and clean up afterwards, also on errors, Ctrl-C and SIGTERM (see
    ``clean_up``). Returns the exit status: 1 when ``check`` and the target was missed,
    ``INTERRUPTED`` after Ctrl-C or SIGTERM, else 0."""
    created: list[str] = []
    try:
        with sigterm_as_keyboard_interrupt():
            urls = []
            for name in names:
                urls.append(create_pg_database(name))
                created.append(name)
            met = body(*urls)
            return 1 if check and not met else 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return INTERRUPTED
    finally:
        clean_up(created, redis_url, queue)


def clean_up(databases: Sequence[str], redis_url: str | None, queue: str | None) -> None:
    """Close this process's connections (the console's kept target connections, Django's),
    drop ``databases`` and remove the Redis ``queue``; what fails is reported, not raised."""
    services = sys.modules.get("migrations_ops.services")
    if services is not None:
        services._kept_target_connections.clear()
    if "django" in sys.modules:
        from django.db import connections

        connections.close_all()
    for name in databases:
        try:
            drop_pg_database(name)
        except psycopg.Error as error:
            print(f"could not drop database {name}: {error}", file=sys.stderr)
    if redis_url is not None and queue is not None:
        try:
            delete_queue_keys(redis_url, queue)
        except Exception as error:  # the Redis client raises many kinds
            print(f"could not remove Redis queue {queue}: {error}", file=sys.stderr)


# --- the console -------------------------------------------------------------------------------
# The runbook convention's books, as a runbook-convention target database has them.
RUNBOOK_BOOKS = [
    "CREATE TABLE migrations (filename TEXT PRIMARY KEY, applied_at TIMESTAMPTZ)",
    "CREATE TABLE migration_lock (id INTEGER PRIMARY KEY, locked_by TEXT, locked_at TIMESTAMPTZ)",
]


def configure_console(
    database_url: str, *, redis_url: str = "", queue: str | None = None, **extra: str
) -> dict[str, str]:
    """Put what the console reads into this process's environment (before ``django.setup()``)
    and return it, to pass on to a worker: configured as deployed (DEBUG off). With a ``queue``,
    tasks go to it on the broker at ``redis_url`` and nothing runs them in-process; without a
    ``redis_url``, no broker. ``extra`` adds or overrides variables."""
    env = {
        "DJANGO_SETTINGS_MODULE": "opsconsole.settings",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        # As deployed: no DEBUG query log growing in any process.
        "DEBUG": "false",
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
        # Target URLs are encrypted at rest and the audit chain is keyed; as deployed, the keys
        # come from the environment (throw-away ones for the bench's own databases).
        "TARGET_SECRET_KEY": os.environ.get("TARGET_SECRET_KEY")
        or base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "AUDIT_CHAIN_KEY": os.environ.get("AUDIT_CHAIN_KEY")
        or base64.b64encode(os.urandom(36)).decode(),
        # The chain's witness of this run's own console database, under its own key.
        "AUDIT_WITNESS_PATH": os.environ.get("AUDIT_WITNESS_PATH") or _throw_away_witness(),
    }
    if queue is not None:
        env |= {"CELERY_QUEUE": queue, "CELERY_TASK_ALWAYS_EAGER": "false"}
    env |= extra
    os.environ.update(env)
    return env


def _throw_away_witness() -> str:
    folder = tempfile.mkdtemp(prefix="opsconsole-bench-witness-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return os.path.join(folder, "audit-witness.json")


def set_up_console(target_url: str, target_name: str, target_sql: Sequence[str]) -> tuple:
    """``django.setup()``, ``migrate`` the console database, run ``target_sql`` on the target
    database and register it as a staging Target of the runbook convention. Returns
    ``(services, operator, target)``: the services module, the shell operator and the Target."""
    import django

    django.setup()

    from django.core.management import call_command

    from migrations_ops import services
    from migrations_ops.actors import Actor

    call_command("migrate", verbosity=0, interactive=False)
    with psycopg.connect(target_url, autocommit=True) as conn:
        for statement in target_sql:
            conn.execute(statement)
    operator = Actor.shell_operator()
    target = services.register_target(
        actor=operator,
        name=target_name,
        url=target_url,
        convention="runbook",
        environment="staging",
        lock_timeout_seconds=60,
    )
    return services, operator, target


def services_holding(name: str) -> list:
    """``migrations_ops.services`` and those of its modules that hold ``name`` (the module
    defining it and each importing it): a module calls its own binding, so a wrapper timing
    one of the services must replace it in every one of them."""
    from migrations_ops import services

    original = getattr(services, name)
    package = services.__name__
    return [
        module
        for module_name, module in sorted(sys.modules.items())
        if (module_name == package or module_name.startswith(package + "."))
        and getattr(module, name, None) is original
    ]


# --- Redis -------------------------------------------------------------------------------------
@contextlib.contextmanager
def redis_client(redis_url: str) -> Iterator:
    """A Redis client for ``redis_url``, closed afterwards."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def delete_queue_keys(redis_url: str, queue: str) -> None:
    """Remove what kombu keeps in Redis for one queue (the list and its binding sets). The
    shared ``_kombu.binding_deadlines`` set expires its members by itself."""
    with redis_client(redis_url) as client:
        client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


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


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def header(title: str, width: int) -> str:
    """The head of a table of ``row``s, ``title`` in a column ``width`` wide."""
    return f"{title:<{width}}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}   (ms)"


def row(label: str, values: Sequence[float], width: int) -> str:
    """``label`` in a column ``width`` wide, then p50, p90, p99 and max of ``values`` (seconds)
    in milliseconds."""
    s = summary(values)
    return f"{label:<{width}}{ms(s['p50'])}{ms(s['p90'])}{ms(s['p99'])}{ms(s['max'])}"


def machine_line(load_before: float, load_after: float, runs: str) -> str:
    """The machine's CPUs and its load before and after the timed ``runs`` ("runs", "rounds")."""
    return (
        f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before:.2f} before the "
        f"{runs}, {load_after:.2f} after (other work on the machine skews the figures)"
    )
