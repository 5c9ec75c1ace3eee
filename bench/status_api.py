"""The read API under load: GET /api/migrations/status and GET /api/targets/<name>/flags.

    .venv/bin/python bench/status_api.py [--duration S] [--connections N] [--targets N]
                                         [--workers N] [--threads N] [--check]
                                         [--cache-outage]

Builds everything it needs on the local PostgreSQL and Redis and removes it at the end (also
on Ctrl-C and errors): a console database, a target database holding one schema per target
(50 by default, each with the runbook's books, registered as staging Targets), an API token
scoped to all of them, and a key prefix of its own in Redis (the console's cache).

The console is served as deployed: gunicorn with ``opsconsole.settings_production`` (DEBUG
off, secrets from the environment), behind what would be a TLS proxy (X-Forwarded-Proto:
https). Each endpoint is loaded for ``--duration`` seconds by ``--connections`` concurrent
clients with the token: ``wrk`` when installed (its own latency percentiles, from a Lua
script), else a Python client whose figures are limited by the client itself. The flags are
asked for each target in turn; the status of all targets at once, as a monitor polls it.

Targets: status >= 800 req/s with p99 <= 40 ms; flags >= 2,000 req/s with p99 <= 20 ms.

Workers: sync, one more than the cores (``--workers``). Each request is CPU-bound Python but
waits twice while a worker holds it: for Redis's answer (the token and the targets version),
and for the client to close after the answer (gunicorn lingers until it has). With one worker
per core those waits left the cores idle 7% of the time; a third worker fills them: flags
2,450-2,750 req/s with p99 19-22 ms on 2 workers, 2,650-2,880 req/s with p99 16-19 ms on 3, and
status p99 28-32 ms instead of 30-34 ms; 4 or 5 workers did no better (more switching between
them). Sync workers answer a request and close its connection, as behind a buffering proxy
(gunicorn's advice for them); every worker takes the next connection from the one queue the
listening socket holds, so a worker that falls behind (descheduled, or reading the targets'
status again) delays only the request it holds. gthread workers keep each client's connection
alive, so a worker's share of the clients waits on it whenever it falls behind: measured on the
same code, 3 gthread workers x 1 thread gave the flags a p99 of 24-36 ms and 2 sync workers
17-20 ms in most runs, at about the same rate and with about 0.1 ms less worker CPU per request
(accepting and closing a connection costs less than handing each request between a gthread
worker's two threads). ``--worker-class gthread`` measures the other way; with it each worker
takes at most its share of the clients' connections (``--worker-connections``), else one could
take most of them at the start and the run measure one core.

Kept target connections: every worker that reads the targets' status again keeps a connection
to each target (TARGET_KEEP_CONNECTIONS_MAX). Deployed, each target is a server of its own and
sees one connection per worker; here all targets are schemas on one PostgreSQL server, so the
workers would hold workers x targets connections. ``--keep-connections`` is lowered to what
fits that server's max_connections (leaving some for the console and everything else), else
the status readings fail with "too many clients" (3 workers x 50 targets on 100 connections).

``--cache-outage``: the cache gets a redis-server of the bench's own (CACHE_URL; the broker
stays on the shared Redis), and each endpoint is loaded twice in the same run: with that Redis
up, then after killing it. Printed side by side: the answers by HTTP status and the latencies,
which show what the applications see while the cache's Redis is down (opsconsole/cache.py).
Measured on 2 busy CPUs (load 5-8 from other work), 50 targets, 4 clients: the flags 100% 200
either way, p50 12-16 ms / p99 24-33 ms with Redis up, p50 40-63 ms / p99 89-114 ms with it
killed (each request then reads the token and the target's row from the database: 4.5-5.5 ms
of worker CPU instead of 1.4-1.6); the status 100% 200 either way, each worker reading the
targets again itself instead of one for all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import harness  # noqa: E402 (needs the path above)
import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

REDIS_DB = 13
SHARED_MEMORY = Path("/dev/shm")  # noqa: S108 (gunicorn's heartbeat files: nothing secret)
TARGETS = {  # endpoint: (requests per second at least, p99 at most in ms)
    "status": (800.0, 40.0),
    "flags": (2000.0, 20.0),
}
WRK_SCRIPT = """
local paths = {%(paths)s}
local requests = {}
local i = 0
init = function(args)
  for n, path in ipairs(paths) do requests[n] = wrk.format("GET", path) end
end
request = function()
  i = i %% #requests + 1
  return requests[i]
end
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "RESULT {\\"requests\\": %%d, \\"seconds\\": %%f, \\"p50\\": %%f, \\"p99\\": %%f, "
    .. "\\"max\\": %%f, \\"non_2xx\\": %%d, \\"socket_errors\\": %%d}\\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, errors.status,
    errors.connect + errors.read + errors.write + errors.timeout))
end
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds per endpoint (20)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent clients (32)")
    parser.add_argument("--targets", type=int, default=50, help="targets registered (50)")
    parser.add_argument(
        "--workers", type=int, default=(os.cpu_count() or 2) + 1, help="(the cores + 1)"
    )
    parser.add_argument("--threads", type=int, default=1, help="per gunicorn worker (1)")
    parser.add_argument(
        "--worker-class", default="sync", choices=["sync", "gthread"], help="(sync)"
    )
    parser.add_argument(
        "--status-max-age", type=float, default=5, help="STATUS_MAX_AGE, seconds (5)"
    )
    parser.add_argument(
        "--keep-connections",
        type=int,
        default=64,
        help="TARGET_KEEP_CONNECTIONS_MAX per worker (64, the default: every status re-read on "
        "kept connections up to 64 targets; lowered to what the PostgreSQL server takes)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when a target is missed"
    )
    parser.add_argument(
        "--cache-outage",
        action="store_true",
        help="load each endpoint with the cache's Redis up, then with it killed, side by side",
    )
    args = parser.parse_args(argv)
    if min(args.duration, args.connections, args.targets, args.workers, args.threads) < 1:
        parser.error("every count must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suffix = os.getpid()
    redis_url = f"{harness.REDIS_SERVER}/{REDIS_DB}"
    key_prefix = f"opsconsole-bench-{suffix}"
    workdir = Path(tempfile.mkdtemp(prefix="opsconsole-bench-api-"))
    cache_redis = OwnRedis(workdir)

    def bench(console_url: str, target_url: str) -> bool:
        args.keep_connections = min(args.keep_connections, connections_per_worker(args.workers))
        if args.cache_outage:
            cache_redis.start()
        env = harness.configure_console(
            console_url,
            redis_url=redis_url,
            DJANGO_SETTINGS_MODULE="opsconsole.settings_production",
            SECRET_KEY=secrets.token_urlsafe(64),
            TARGET_SECRET_KEY=fernet_key(),
            ALLOWED_HOSTS="127.0.0.1",
            CACHE_KEY_PREFIX=key_prefix,
            CACHE_URL=cache_redis.url if args.cache_outage else redis_url,
            STATUS_MAX_AGE=str(args.status_max_age),
            TARGET_KEEP_CONNECTIONS_MAX=str(args.keep_connections),
        )
        return run(args, env, target_url, workdir, cache_redis)

    try:
        return harness.run_with_databases(
            [f"opsconsole_bench_api_{suffix}", f"opsconsole_bench_api_targets_{suffix}"],
            bench,
            check=args.check,
        )
    finally:
        cache_redis.stop()
        delete_cache_keys(redis_url, key_prefix)
        shutil.rmtree(workdir, ignore_errors=True)


# Connections of the PostgreSQL server left to the console's own database, the bench and anything
# else running on it, when sharing the rest between the workers' kept target connections.
OTHER_PG_CONNECTIONS = 20


def connections_per_worker(workers: int) -> int:
    """Kept target connections each worker can have without the server running out of them
    (all targets are on the one local server here)."""
    with psycopg.connect(f"{harness.PG_SERVER}/postgres") as conn:
        max_connections = int(conn.execute("SHOW max_connections").fetchone()[0])
    return max(1, (max_connections - OTHER_PG_CONNECTIONS) // workers)


class OwnRedis:
    """A redis-server of the bench's own on a free port, keeping nothing on disk, to kill."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("--cache-outage needs redis-server on the PATH")
        self.process = subprocess.Popen(
            [
                *(executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the cache's redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            harness.stop_process(self.process)
            self.process = None


def fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def delete_cache_keys(redis_url: str, prefix: str) -> None:
    try:
        with harness.redis_client(redis_url) as client:
            for key in client.scan_iter(match=f"{prefix}:*"):
                client.delete(key)
    except Exception as error:  # the Redis client raises many kinds
        print(f"could not remove the cache keys {prefix}:*: {error}", file=sys.stderr)


def set_up(target_url: str, count: int) -> tuple[list[str], str]:
    """Migrate the console, build ``count`` target schemas and register them; returns the
    targets' names and an API token reading all of them."""
    import django

    django.setup()
    from django.core.management import call_command

    from migrations_ops import services
    from migrations_ops.actors import Actor

    call_command("migrate", verbosity=0, interactive=False)
    operator = Actor.shell_operator()
    names, targets = [], []
    with psycopg.connect(target_url, autocommit=True) as conn:
        for index in range(count):
            schema = f"app{index:02d}"
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            for statement in harness.RUNBOOK_BOOKS:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO migrations (filename, applied_at) VALUES "
                "('001_create_users.sql', now() - interval '2 days'), "
                "('002_add_email.sql', now() - interval '1 day')"
            )
            name = f"orders-{index:02d}"
            targets.append(
                services.register_target(
                    actor=operator,
                    name=name,
                    url=target_url,
                    convention="runbook",
                    environment="staging",
                    schema=schema,
                    lock_timeout_seconds=60,
                )
            )
            names.append(name)
    _, token = services.create_api_token(actor=operator, name="bench", targets=targets)
    harness.clean_up([], None, None)  # close this process's connections before serving
    return names, token


def run(args, env: dict[str, str], target_url: str, workdir: Path, cache_redis) -> bool:
    names, token = set_up(target_url, args.targets)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = workdir / "gunicorn.log"
    with gunicorn(env, port, args, log_path) as server:
        headers = {"Authorization": f"Bearer {token}", "X-Forwarded-Proto": "https"}
        # Read every target once (as the console's own pages would have), then load.
        answer = get_json(f"{base}/api/migrations/status?live=1", headers)
        if len(answer["targets"]) != args.targets:
            raise RuntimeError(f"the status answer holds {len(answer['targets'])} targets")
        for name in names:
            get_json(f"{base}/api/targets/{name}/flags", headers)
        load_before = os.getloadavg()[0]
        endpoints = (
            ("status", ["/api/migrations/status"]),
            ("flags", [f"/api/targets/{n}/flags" for n in names]),
        )
        results = load_endpoints(args, server, base, endpoints, headers, workdir)
        if args.cache_outage:
            cache_redis.stop()
            down = load_endpoints(args, server, base, endpoints, headers, workdir)
            load_after = os.getloadavg()[0]
            return report_outage(args, results, down, load_before, load_after)
        load_after = os.getloadavg()[0]
    return report(args, results, load_before, load_after)


def load_endpoints(args, server, base, endpoints, headers, workdir) -> dict[str, dict]:
    results = {}
    for endpoint, paths in endpoints:
        cpu_before = server.cpu_seconds()
        results[endpoint] = load(args, base, paths, headers, workdir)
        results[endpoint]["server_cpu_ms"] = (
            (server.cpu_seconds() - cpu_before) / max(results[endpoint]["requests"], 1) * 1000
        )
    return results


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class gunicorn:
    """gunicorn serving the console on 127.0.0.1:``port``; stopped on exit."""

    def __init__(self, env, port, args, log_path):
        self.command = [
            sys.executable,
            "-m",
            "gunicorn",
            "opsconsole.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(args.workers),
            "--worker-class",
            args.worker_class,
            "--threads",
            str(args.threads),
            "--keep-alive",
            "30",
            "--backlog",
            "1024",
            # Each worker takes at most its share of the clients' kept-alive connections, so
            # none is left with most of them while another idles.
            "--worker-connections",
            str(-(-args.connections // args.workers) + 1),
        ]
        if SHARED_MEMORY.is_dir():
            # The workers' heartbeat touches a file on every loop: keep it in memory, not on an
            # overlay or disk file system (gunicorn's own advice for containers).
            self.command += ["--worker-tmp-dir", str(SHARED_MEMORY)]
        self.env, self.port, self.log_path = env, port, log_path

    def __enter__(self):
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            self.command,
            cwd=harness.ROOT,
            env={**os.environ, **self.env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"gunicorn did not start:\n{self.log_path.read_text()}"
                    ) from None
                time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """CPU time the workers have used (user + system), from /proc."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        total_ticks = 0
        for pid in children.read_text().split():
            with contextlib.suppress(OSError):  # a worker just restarted
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total_ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return total_ticks / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc):
        harness.stop_process(self.process)
        self.log.close()


def get_json(url: str, headers: dict[str, str]) -> dict:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (http only)
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        return json.loads(response.read())


def load(args, base: str, paths: list[str], headers: dict[str, str], workdir: Path) -> dict:
    if shutil.which("wrk"):
        return load_with_wrk(args, base, paths, headers, workdir)
    return load_with_python(args, base, paths, headers)


def load_with_wrk(args, base, paths, headers, workdir) -> dict:
    script = workdir / "paths.lua"
    script.write_text(WRK_SCRIPT % {"paths": ", ".join(json.dumps(p) for p in paths)})
    command = [
        "wrk",
        # One thread is plenty for wrk (it is C on epoll), and leaves the server the most CPU.
        "--threads",
        "1",
        "--connections",
        str(args.connections),
        "--duration",
        f"{args.duration}s",
        "--timeout",
        "5s",
        "--script",
        str(script),
    ]
    for name, value in headers.items():
        command += ["--header", f"{name}: {value}"]
    output = subprocess.run([*command, base], capture_output=True, text=True, check=True).stdout
    match = re.search(r"^RESULT (.*)$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{output}")
    result = json.loads(match.group(1))
    result |= {"rps": result["requests"] / result["seconds"], "client": "wrk"}
    result["statuses"] = {"2xx": result["requests"] - result["non_2xx"]}
    if result["non_2xx"]:
        result["statuses"]["other"] = result["non_2xx"]
    return result


def load_with_python(args, base, paths, headers) -> dict:
    """Threads of http.client on kept connections: the GIL makes this client the bottleneck
    long before the server, so its figures are a lower bound."""
    import http.client

    latencies: list[float] = []
    errors = [0, 0]
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + args.duration
    host, port = base.removeprefix("http://").split(":")

    def client(offset: int) -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        mine, index = [], offset
        while time.monotonic() < stop_at:
            path = paths[index % len(paths)]
            index += 1
            started = time.perf_counter()
            try:
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                response.read()
            except OSError:
                with lock:
                    errors[1] += 1
                connection = http.client.HTTPConnection(host, int(port), timeout=5)
                continue
            mine.append(time.perf_counter() - started)
            with lock:
                statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
                if response.status >= 300:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    return {
        "requests": len(latencies),
        "seconds": seconds,
        "rps": len(latencies) / seconds,
        "p50": harness.percentile(latencies, 0.50) * 1000,
        "p99": harness.percentile(latencies, 0.99) * 1000,
        "max": max(latencies) * 1000,
        "non_2xx": errors[0],
        "socket_errors": errors[1],
        "statuses": statuses,
        "client": "python (client-limited: the figures are a lower bound)",
    }


def report(args, results: dict[str, dict], load_before: float, load_after: float) -> bool:
    print(
        f"{args.targets} targets, {args.connections} concurrent clients, {args.duration} s per "
        f"endpoint; gunicorn {args.worker_class}, {args.workers} workers x {args.threads} threads, "
        f"opsconsole.settings_production (DEBUG off), cache in Redis, "
        f"STATUS_MAX_AGE={args.status_max_age:g} s, "
        f"TARGET_KEEP_CONNECTIONS_MAX={args.keep_connections}"
    )
    print(f"load generator: {results['status']['client']}")
    print(
        f"{'endpoint':<34}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}"
        f"{'cpu ms':>8}  errors  target"
    )
    met = True
    for endpoint, path in (
        ("status", "GET /api/migrations/status"),
        ("flags", "GET /api/targets/<name>/flags"),
    ):
        result = results[endpoint]
        rps_min, p99_max = TARGETS[endpoint]
        errors = result["non_2xx"] + result["socket_errors"]
        ok = result["rps"] >= rps_min and result["p99"] <= p99_max and errors == 0
        met &= ok
        print(
            f"{path:<34}{result['rps']:>8.0f}{result['p50']:>8.2f}{result['p99']:>8.2f}"
            f"{result['max']:>8.1f}{result['server_cpu_ms']:>8.2f}  {errors:>6}  "
            f">= {rps_min:.0f} req/s, p99 <= {p99_max:g} ms: "
            f"{'met' if ok else 'MISSED'}"
        )
    print(
        "cpu ms: the gunicorn workers' CPU time per request (user + system); on an otherwise "
        f"idle machine its {os.cpu_count()} CPUs cap the rate near {os.cpu_count()}000 / cpu ms"
    )
    print(harness.machine_line(load_before, load_after, "runs"))
    return met


def report_outage(args, up: dict, down: dict, load_before: float, load_after: float) -> bool:
    """Side by side: each endpoint with the cache's Redis up, then killed. Met when every answer
    while it is down is a 2xx, as with it up."""
    print(
        f"{args.targets} targets, {args.connections} concurrent clients, {args.duration} s per "
        f"endpoint and phase; gunicorn {args.worker_class}, {args.workers} workers x "
        f"{args.threads} threads, opsconsole.settings_production (DEBUG off), cache in a Redis "
        f"of its own (CACHE_URL), STATUS_MAX_AGE={args.status_max_age:g} s"
    )
    print(f"load generator: {up['status']['client']}")
    print(
        f"{'endpoint':<32}{'cache Redis':<13}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}"
        f"{'cpu ms':>8}  answers"
    )
    met = True
    for endpoint, path in (
        ("status", "GET /api/migrations/status"),
        ("flags", "GET /api/targets/<name>/flags"),
    ):
        for phase, result in (("up", up[endpoint]), ("killed", down[endpoint])):
            answers = ", ".join(
                f"{count} x {status}" for status, count in sorted(result["statuses"].items())
            )
            if result["socket_errors"]:
                answers += f", {result['socket_errors']} socket errors"
            met &= result["non_2xx"] + result["socket_errors"] == 0
            print(
                f"{path:<32}{phase:<13}{result['rps']:>8.0f}{result['p50']:>8.2f}"
                f"{result['p99']:>8.2f}{result['max']:>8.1f}{result['server_cpu_ms']:>8.2f}  "
                f"{answers}"
            )
    print(harness.machine_line(load_before, load_after, "runs"))
    return met


if __name__ == "__main__":
    sys.exit(main())
