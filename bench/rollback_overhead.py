"""What the console's rollback of a small migration costs over running its SQL directly.

    .venv/bin/python bench/rollback_overhead.py [--rounds N] [--warmup N] [--phases] [--check]

Builds everything it needs on the local PostgreSQL and Redis and removes it at the end (also on
Ctrl-C, SIGTERM and errors): a console database (``migrate``), a runbook-convention target
database -- ``migrations(filename, applied_at)``, ``migration_lock(id, locked_by, locked_at)``
and ``orders(id, customer_id)`` -- registered as a staging Target, one migration imported with
``services.import_scripts`` from a temporary folder (dbmate layout):

    001_orders_customer_index.sql   up:   CREATE INDEX orders_customer_idx ON orders (customer_id);
                                    down: DROP INDEX orders_customer_idx;

Every round re-applies the migration directly with psycopg (its up SQL and the INSERT into
``migrations``, in one transaction, untimed) and then times one of

(a) console: from just before ``services.request_rollback(...)`` (latest applied migration)
    until ``services.execute_operation(op.pk)`` has returned the Operation ``succeeded``, both
    called in this process: the request's live read of the books and the lock, the Operation
    and AuditEvent rows, and the whole run (claim, target connection -- a kept one, whose
    session is reset before it is lent after a migration's SQL ran on it, i.e. once a round --,
    lock taken and committed, the transaction with the books read again under the lock and
    the lock released in it, the finish with the lock observation); a real run takes no catalog
    snapshots (only dry runs report changes);
(b) direct: on a kept psycopg connection, ``BEGIN; DROP INDEX orders_customer_idx;
    DELETE FROM migrations WHERE filename = '001_orders_customer_index.sql'; COMMIT``
    (the same down SQL, taken from the imported script, and the same DELETE the console runs);

(a) and (b) alternate, each round doing both in an order that swaps every round, so both see
the same noise. After every timed step the target is checked (index gone, book entry gone, lock
free), untimed.

How the request is kept from running the operation itself: ``_create_operation`` hands the
operation to Celery in ``transaction.on_commit`` (``send_operation`` -> ``.delay()``). Eager
mode would run it right there, inside ``request_rollback``, and the direct call would then find
it already claimed. So the console is configured as deployed -- CELERY_TASK_ALWAYS_EAGER=false
and a Redis broker (database 14) -- with a queue of its own that no worker consumes: every
request really publishes its message (that send is part of the request's cost in production,
and it is timed), nobody runs it, and this process calls ``execute_operation`` in the worker's
place. Nothing is patched. Even if the message were consumed, the conditional claim would make
it a no-op. The queue is checked to hold exactly one message per request, then deleted.

Not included on either side: Celery's task framing in a worker (message receipt, the
``close_old_connections`` around a task, its health-check ping) and Django's request handling;
this is the service-level cost. The console runs as deployed otherwise (settings from the
environment, DEBUG off, kept target connections on); this process freezes its start-up objects
out of the garbage collector's reach as opsconsole/wsgi.py and the worker do.

Target: the console's service-level call adds at most 10 ms at p50 (p50 of (a) minus p50 of
(b)). ``--phases`` then runs as many console rounds again with every step wrapped and timed
(the headline figures are taken without these wrappers) and prints where the time goes, with
the console's and the target's round trips.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import harness  # noqa: E402 (needs the path above)
import psycopg  # noqa: E402

TARGET_OVERHEAD_P50_MS = 10.0
_MISSING = object()
REDIS_DB = 14

MIGRATION_FILE = "001_orders_customer_index.sql"
MIGRATION_TEXT = """\
-- migrate:up
CREATE INDEX orders_customer_idx ON orders (customer_id);

-- migrate:down
DROP INDEX orders_customer_idx;
"""
TARGET_SQL = [
    *harness.RUNBOOK_BOOKS,
    "CREATE TABLE orders (id int, customer_id int)",
    "INSERT INTO orders SELECT g, g % 100 FROM generate_series(1, 1000) AS g",
]
RECORD_APPLIED = "INSERT INTO migrations (filename, applied_at) VALUES (%s, now())"
REMOVE_APPLIED = "DELETE FROM migrations WHERE filename = %s"
TARGET_STATE = (
    "SELECT to_regclass('orders_customer_idx') IS NOT NULL,"
    " (SELECT count(*) FROM migrations WHERE filename = %s),"
    " (SELECT count(*) FROM migration_lock)"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=300, help="timed rollbacks of each kind (default 300)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed rounds of both first, so one-off costs (first broker connection, first "
        "queries) are not counted (default 5)",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="then time as many console rounds again step by step and print the breakdown",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when the target is not met"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suffix = os.getpid()
    queue = f"opsconsole-bench-rollback-{suffix}"
    redis_url = f"{harness.REDIS_SERVER}/{REDIS_DB}"
    workdir = Path(tempfile.mkdtemp(prefix="opsconsole-bench-rollback-"))

    def bench(console_url: str, target_url: str) -> bool:
        harness.configure_console(console_url, redis_url=redis_url, queue=queue)
        return run(args, target_url, redis_url, queue, workdir)

    try:
        return harness.run_with_databases(
            [f"opsconsole_bench_rollback_{suffix}", f"opsconsole_bench_rollback_target_{suffix}"],
            bench,
            check=args.check,
            redis_url=redis_url,
            queue=queue,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(
    args: argparse.Namespace, target_url: str, redis_url: str, queue: str, workdir: Path
) -> bool:
    """Set up the console and the target, time the rounds, print the figures; True when the
    target was met."""
    services, operator, target = harness.set_up_console(
        target_url, "bench-rollback-target", TARGET_SQL
    )
    folder = workdir / "migrations"
    folder.mkdir()
    (folder / MIGRATION_FILE).write_text(MIGRATION_TEXT)
    imported = services.import_scripts(actor=operator, target=target, directory=str(folder))
    if imported.added != [MIGRATION_FILE]:
        raise RuntimeError(f"the import did not add {MIGRATION_FILE}: {imported.as_dict()}")
    (script,) = services.engine_scripts(target)

    # As opsconsole/wsgi.py does in the web process and the worker at start-up.
    gc.freeze()
    with (
        psycopg.connect(target_url, autocommit=True) as writer,
        psycopg.connect(target_url, autocommit=True) as direct,
    ):
        bench = RollbackBench(services, operator, target, script, writer, direct)
        load_before = os.getloadavg()[0]
        for index in range(args.warmup):
            bench.round(index, timed=False)
        console, direct_times = [], []
        collections_before = full_collections()
        for index in range(args.rounds):
            result = bench.round(index, timed=True)
            console.append(result["console"])
            direct_times.append(result["direct"])
        collections = full_collections() - collections_before
        load_after = os.getloadavg()[0]
        timer = None
        if args.phases:
            timer = PhaseTimer()
            timer.install()
            try:
                for index in range(args.rounds):
                    timer.reset()
                    bench.reapply()
                    bench.console_once(f"phases {index}")
                    bench.check_rolled_back(f"phases {index}")
                    timer.keep_round()
            finally:
                timer.uninstall()
    requests = bench.requests
    published = queued_messages(redis_url, queue)
    if published != requests:
        raise RuntimeError(
            f"{requests} rollbacks were requested but the queue holds {published} messages: "
            "something consumed or lost them"
        )

    met = report(args, console, direct_times, load_before, load_after, collections, published)
    if timer is not None:
        report_phases(timer)
    return met


def full_collections() -> int:
    return gc.get_stats()[2]["collections"]


def queued_messages(redis_url: str, queue: str) -> int:
    with harness.redis_client(redis_url) as client:
        return int(client.llen(queue))


class RollbackBench:
    def __init__(self, services, operator, target, script, writer, direct):
        from migrations_ops.models import Operation, OperationStatus

        self.services = services
        self.operator = operator
        self.target = target
        self.script = script
        self.up = [statement.sql for statement in script.up_statements]
        self.down = [statement.sql for statement in script.down_statements]
        self.writer = writer
        self.direct_cursor = direct.cursor()
        self.direct = direct
        self.Operation = Operation
        self.succeeded = OperationStatus.SUCCEEDED
        self.requests = 0

    def round(self, index: int, *, timed: bool) -> dict:
        label = f"{'round' if timed else 'warm-up'} {index}"
        order = ("console", "direct") if index % 2 == 0 else ("direct", "console")
        result = {}
        for kind in order:
            self.reapply()
            if kind == "console":
                result[kind] = self.console_once(label)
            else:
                result[kind] = self.direct_once()
            self.check_rolled_back(f"{label} ({kind})")
        return result

    def reapply(self) -> None:
        """The migration applied again, as its tool would: up SQL and book entry, one
        transaction (untimed)."""
        with self.writer.transaction():
            for statement in self.up:
                self.writer.execute(statement)
            self.writer.execute(RECORD_APPLIED, (MIGRATION_FILE,))

    def console_once(self, label: str) -> float:
        start = time.perf_counter()
        operation = self.services.request_rollback(
            actor=self.operator, target=self.target, reason=f"bench {label}"
        )
        self.requests += 1
        done = self.services.execute_operation(operation.pk)
        elapsed = time.perf_counter() - start
        if done is None:
            raise RuntimeError(f"{label}: operation #{operation.pk} was not queued any more")
        if done.status != self.succeeded:
            raise RuntimeError(f"{label}: operation #{operation.pk} {done.status}: {done.error}")
        return elapsed

    def direct_once(self) -> float:
        cursor = self.direct_cursor
        start = time.perf_counter()
        with self.direct.transaction():
            for statement in self.down:
                cursor.execute(statement)
            cursor.execute(REMOVE_APPLIED, (MIGRATION_FILE,))
        elapsed = time.perf_counter() - start
        if cursor.rowcount != 1:
            raise RuntimeError(f"the direct DELETE removed {cursor.rowcount} book entries")
        return elapsed

    def check_rolled_back(self, label: str) -> None:
        index, entries, locks = self.writer.execute(TARGET_STATE, (MIGRATION_FILE,)).fetchone()
        if index or entries or locks:
            raise RuntimeError(
                f"{label}: not rolled back cleanly (index present: {index}, book entries: "
                f"{entries}, lock rows: {locks})"
            )


# --- the step-by-step breakdown (--phases) -----------------------------------------------------
class PhaseTimer:
    """Wraps functions of services and the engine (and the console's and target's SQL) so that
    every call adds its time under the chain of wrapped calls it runs in: a tree per round."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.durations: dict[tuple[str, ...], float] = {}
        self.calls: dict[tuple[str, ...], int] = {}
        self.rounds: list[tuple[dict, dict]] = []
        self._undo: list[Callable[[], None]] = []

    def reset(self) -> None:
        self.stack.clear()
        self.durations, self.calls = {}, {}

    def keep_round(self) -> None:
        self.rounds.append((self.durations, self.calls))

    @contextlib.contextmanager
    def span(self, label: str) -> Iterator[None]:
        self.stack.append(label)
        path = tuple(self.stack)
        self.durations.setdefault(path, 0.0)  # first seen at its start: the tree in call order
        start = time.perf_counter()
        try:
            yield
        finally:
            self.durations[path] += time.perf_counter() - start
            self.calls[path] = self.calls.get(path, 0) + 1
            self.stack.pop()

    def wrap(self, owner: object, name: str, label: str) -> None:
        """Time ``owner.name`` (a module's function, a class's method, an object's method)."""
        saved = vars(owner).get(name, _MISSING)
        setattr(owner, name, self._timed(getattr(owner, name), label))
        if saved is _MISSING:  # an inherited method: the wrapper only hides it
            self._undo.append(lambda: delattr(owner, name))
        else:
            self._undo.append(lambda: setattr(owner, name, saved))

    def install(self) -> None:
        from django.db import connections

        from migrations_ops import engine, services
        from migrations_ops.engine import catalog, conventions, runner
        from migrations_ops.engine import connection as engine_connection
        from migrations_ops.models import OperationKind

        wrap = self.wrap
        # Each module of services calls its own binding: time the function in every one.
        for name, label in (
            ("request_rollback", "request_rollback()"),
            ("read_target_status", "live read of lock + books"),
            ("observe_lock", "observe_lock (one UPDATE)"),
            ("_claim", "_claim (UPDATE ... RETURNING, the target)"),
            ("script_summaries", "script_summaries (scripts without SQL)"),
            ("engine_scripts", "engine_scripts (the chosen script)"),
            ("_create_operation", "Operation + AuditEvent insert, commit"),
            ("send_operation", "on_commit: publish to the broker (Redis)"),
            ("execute_operation", "execute_operation()"),
            ("_finish", "_finish (Operation + observation update, AuditEvent, commit)"),
        ):
            for module in harness.services_holding(name):
                wrap(module, name, label)
        wrap(engine_connection, "_reset", "reset the kept connection (DISCARD ALL)")
        wrap(engine_connection, "_connect_postgresql", "NEW target connection")
        wrap(engine_connection.TargetConnection, "close", "close target connection")
        wrap(conventions.Convention, "read_applied", "read_applied")
        wrap(conventions.Convention, "read", "read lock + books (one round trip)")
        wrap(conventions.Convention, "read_lock", "read_lock")
        wrap(conventions.Convention, "try_take_lock", "try_take_lock (own txn, committed)")
        wrap(conventions.RunbookConvention, "release_own_lock", "release_own_lock")
        wrap(engine, "run_migrations", "engine.run_migrations")
        wrap(runner, "acquire_lock", "acquire_lock")
        wrap(runner, "_refuse_stale_lock", "_refuse_stale_lock")
        wrap(runner, "_run_in_transaction", "the migration transaction")
        wrap(runner, "_run_statements", "down SQL (DROP INDEX)")
        wrap(runner, "_keep_books", "books: DELETE FROM migrations")
        wrap(runner, "_release_in_transaction", "release the lock (in the transaction)")
        wrap(runner, "_release", "release the lock (on its own)")
        wrap(catalog, "snapshot", "catalog.snapshot (change report)")
        wrap(catalog, "diff", "catalog.diff")
        runners, kind = services.RUNNERS, OperationKind.ROLLBACK
        rollback = runners[kind]  # execute_operation finds it here, not by its name
        runners[kind] = self._timed(rollback, "_run_rollback")
        self._undo.append(lambda: runners.__setitem__(kind, rollback))

        # Every round trip, attributed to the step it runs in.
        target_connection = engine_connection.TargetConnection
        for name in ("fetch_dicts", "fetch_table", "execute", "run", "columns"):
            wrap(target_connection, name, "target SQL")
        transaction = target_connection.transaction
        target_connection.transaction = self._timed_transaction(transaction)
        self._undo.append(lambda: setattr(target_connection, "transaction", transaction))
        console = connections["default"]
        console.execute_wrappers.append(self._console_sql)
        self._undo.append(lambda: console.execute_wrappers.remove(self._console_sql))
        wrap(console, "commit", "console COMMIT")

    def _timed(self, function: Callable, label: str) -> Callable:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with self.span(label):
                return function(*args, **kwargs)

        return wrapper

    def _timed_transaction(self, original: Callable) -> Callable:
        timer = self

        @contextlib.contextmanager
        def transaction(connection, **options):
            manager = original(connection, **options)
            with timer.span("target BEGIN"):
                manager.__enter__()
            try:
                yield
            except BaseException:
                if not manager.__exit__(*sys.exc_info()):
                    raise
            else:
                with timer.span("target COMMIT"):
                    manager.__exit__(None, None, None)

        return transaction

    def _console_sql(self, execute, sql, params, many, context):
        with self.span("console SQL"):
            return execute(sql, params, many, context)

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()


# --- output ------------------------------------------------------------------------------------
row = functools.partial(harness.row, width=56)
header = functools.partial(harness.header, width=56)


def report(
    args: argparse.Namespace,
    console: list[float],
    direct: list[float],
    load_before: float,
    load_after: float,
    collections: int,
    published: int,
) -> bool:
    from django.conf import settings

    print()
    print(
        f"rollback of {MIGRATION_FILE} (DROP INDEX + book entry), {args.rounds} rounds of each "
        f"(+{args.warmup} warm-up), alternating, PostgreSQL target on this machine"
    )
    print(harness.machine_line(load_before, load_after, "rounds"))
    print(
        f"settings: TARGET_KEEP_CONNECTIONS={settings.TARGET_KEEP_CONNECTIONS}, "
        f"console CONN_MAX_AGE={settings.DATABASES['default']['CONN_MAX_AGE']}, "
        f"CELERY_TASK_ALWAYS_EAGER={settings.CELERY_TASK_ALWAYS_EAGER}; {published} messages "
        "published to an unconsumed Redis queue (one per request), none run by a worker"
    )
    print(header(""))
    print(row("(a) console: request_rollback + execute_operation", console))
    print(row("(b) direct: BEGIN; DROP INDEX; DELETE; COMMIT", direct))
    differences = [a - b for a, b in zip(console, direct, strict=True)]
    print(row("(a) - (b), round by round", differences))
    print(f"full garbage collections inside the timed rounds: {collections}")
    overhead_ms = (harness.percentile(console, 0.5) - harness.percentile(direct, 0.5)) * 1000
    met = overhead_ms <= TARGET_OVERHEAD_P50_MS
    print(
        f"target: the console's service-level call adds at most {TARGET_OVERHEAD_P50_MS:g} ms "
        f"at p50 -> {'MET' if met else 'NOT MET'} (p50 {overhead_ms:.2f} ms over the direct "
        f"SQL, {harness.percentile(console, 0.5) / harness.percentile(direct, 0.5):.1f}x)"
    )
    return met


def report_phases(timer: PhaseTimer) -> None:
    """The tree of steps, in call order: per round, the p50 and mean time of each step (all
    its calls in the round together) and its calls per round; "(rest)" is a step's own time,
    outside the steps shown under it."""
    seen: dict[tuple[str, ...], int] = {}
    for durations, _ in timer.rounds:
        for path in durations:
            seen.setdefault(path, len(seen))
    # Every step under its caller, callers' steps in the order first seen (a step that first
    # appears in a later round still goes under its caller, not at the end).
    paths = sorted(seen, key=lambda path: [seen[path[:end]] for end in range(1, len(path) + 1)])
    rounds = len(timer.rounds)

    def per_round(path):
        return [durations.get(path, 0.0) for durations, _ in timer.rounds]

    def p50_and_mean(values):
        return harness.ms(statistics.median(values)) + harness.ms(statistics.fmean(values))

    width = 66
    print()
    print(
        f"where the console's time goes: {rounds} more rounds, every step wrapped and timed "
        "(each wrapper adds a few microseconds)"
    )
    print(f"{'':<{width}}{'p50':>8}{'mean':>8}{'calls':>7}   (ms per round)")
    for path in paths:
        values = per_round(path)
        calls = sum(c.get(path, 0) for _, c in timer.rounds) / rounds
        label = "  " * (len(path) - 1) + path[-1]
        print(f"{label:<{width}}{p50_and_mean(values)}{calls:7.1f}")
        children = [p for p in paths if len(p) == len(path) + 1 and p[:-1] == path]
        if children:
            rest = [
                total - sum(durations.get(child, 0.0) for child in children)
                for total, (durations, _) in zip(values, timer.rounds, strict=True)
            ]
            label = "  " * len(path) + "(rest)"
            print(f"{label:<{width}}{p50_and_mean(rest)}")
    for kind in ("console SQL", "target SQL"):
        counts = [
            sum(n for path, n in calls.items() if path[-1] == kind) for _, calls in timer.rounds
        ]
        times = [
            sum(t for path, t in durations.items() if path[-1] == kind)
            for durations, _ in timer.rounds
        ]
        print(
            f"{kind}: {statistics.fmean(counts):.1f} statements per round, "
            f"{statistics.median(times) * 1000:.2f} ms at p50 in all"
        )


if __name__ == "__main__":
    sys.exit(main())
