"""How the Operations and Audit events changelists hold up with years of history.

    .venv/bin/python bench/admin_scale.py [--rows N] [--small-rows N] [--runs N] [--warmup N]
                                          [--check]

Builds two console databases of its own on the local PostgreSQL (``migrate``), removed at the
end (also on Ctrl-C, SIGTERM and errors), and seeds them in SQL (``INSERT ... SELECT
generate_series``): the same 8 users and 50 targets (some far busier than others), then
``--small-rows`` (default 10,000) resp. ``--rows`` (default 1,000,000) operations and as many
audit events, spread over 3 years in time order, every status, kind, door and action; then
``VACUUM ANALYZE`` as autovacuum would. The audit table refuses UPDATE and DELETE (a trigger),
so it is only ever inserted into.

Each case is a GET of a changelist through Django's test Client, logged in as a superuser,
with the console configured as deployed (DEBUG off, the database session backend). A case runs
at both sizes in turns, ``ROUNDS`` blocks each (switching the connection between the two
databases, untimed), so other work on the machine weighs on both sizes alike: the median and p90
of about ``--runs`` requests per size, each block after ``--warmup`` untimed ones, then one more
request under ``CaptureQueriesContext`` for the number of queries and the slowest of them.

Target at the large size, for every case: median <= 150 ms, at most 12 queries, and a median
within 1.5x of the same case at the small size.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import harness  # noqa: E402 (needs the path above)
import psycopg  # noqa: E402

TARGET_MEDIAN_MS = 150.0
TARGET_QUERIES = 12
TARGET_RATIO = 1.5
ROUNDS = 3  # blocks of requests per case and size, alternating between the sizes
DEEP_PAGE = 500
YEARS = 3

USERS = [f"oncall-{n}" for n in range(1, 7)] + ["commander-1", "commander-2"]
APPS = [
    "orders",
    "billing",
    "search",
    "inventory",
    "payments",
    "shipping",
    "catalog",
    "accounts",
    "reports",
    "notifications",
    "pricing",
    "reviews",
    "ledger",
    "auth",
    "media",
    "gateway",
    "analytics",
]
ENVIRONMENTS = [("prod", "production"), ("staging", "staging"), ("dev", "development")]
TARGET_COUNT = 50


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="large size (1,000,000)")
    parser.add_argument("--small-rows", type=int, default=10_000, help="small size (10,000)")
    parser.add_argument("--runs", type=int, default=15, help="timed requests per case (15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests first (2)")
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when the target is not met"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or not 0 < args.small_rows <= args.rows:
        parser.error("--runs >= 1, --warmup >= 0, 0 < --small-rows <= --rows")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    databases = {
        args.small_rows: f"opsconsole_bench_admin_{os.getpid()}_small",
        args.rows: f"opsconsole_bench_admin_{os.getpid()}_large",
    }

    def bench(*urls: str) -> bool:
        # No broker: nothing here sends a task. run() switches between the databases.
        harness.configure_console(urls[-1], ALLOWED_HOSTS="testserver")
        return run(args, databases)

    return harness.run_with_databases(list(databases.values()), bench, check=args.check)


# --- seeding -----------------------------------------------------------------------------------
@dataclass
class World:
    user_ids: list[int]
    target_ids: list[int]
    target_names: list[str]


def create_world() -> World:
    from django.contrib.auth import get_user_model

    from migrations_ops.models import Target

    User = get_user_model()
    users = User.objects.bulk_create([User(username=name, is_staff=True) for name in USERS])
    names = [f"{app}-{env}" for app in APPS for env, _ in ENVIRONMENTS][:TARGET_COUNT]
    environments = dict(ENVIRONMENTS)
    targets = Target.objects.bulk_create(
        [
            Target(
                name=name,
                environment=environments[name.rsplit("-", 1)[1]],
                connection_url=f"postgresql://app:secret@db.internal:5432/{name}",
                convention="runbook",
            )
            for name in names
        ]
    )
    return World([u.pk for u in users], [t.pk for t in targets], [t.name for t in targets])


def insert_select(model, exprs: dict[str, str], source: str) -> str:
    """``INSERT INTO <table> (...) SELECT ... FROM <source>``: ``exprs`` give the columns the
    bench cares about; every other column gets NULL if nullable, else the field's default (as
    an inline literal; "" for text), so a field added to the model later does not break the
    bench."""
    from django.db import connection

    columns, values = [], []
    for field in model._meta.concrete_fields:
        if field.primary_key:
            continue
        if field.column in exprs:
            expression = exprs[field.column]
        elif field.null:
            continue
        elif (default := field.get_default()) is not None:  # "" for text without a default
            value = field.get_db_prep_save(default, connection)
            with connection.cursor() as cursor:
                expression = cursor.mogrify("%s", [value])
        else:
            raise RuntimeError(f"the bench does not fill {model.__name__}.{field.name}")
        columns.append(connection.ops.quote_name(field.column))
        values.append(expression)
    table = connection.ops.quote_name(model._meta.db_table)
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(values)} FROM {source}"


def sql_array(values, cast: str) -> str:
    items = ", ".join(f"'{v}'" if isinstance(v, str) else str(v) for v in values)
    return f"(ARRAY[{items}]::{cast}[])"


def weighted(r: str, choices: list[tuple[str, float]]) -> str:
    """A CASE picking one of ``choices`` (value, weight) from the uniform random value ``r``."""
    total = sum(weight for _, weight in choices)
    cases, edge = [], 0.0
    for value, weight in choices[:-1]:
        edge += weight / total
        cases.append(f"WHEN {r} < {edge:.6f} THEN '{value}'")
    return f"(CASE {' '.join(cases)} ELSE '{choices[-1][0]}' END)"


def random_rows(n: int, randoms: int) -> str:
    columns = ", ".join(f"random() AS r{k}" for k in range(1, randoms + 1))
    return f"(SELECT i, {columns} FROM generate_series(1, {n}) AS i) AS s"


DOORS = [("admin", 40), ("cli", 30), ("api", 20), ("task", 10)]
KINDS = [
    ("apply", 35),
    ("verify", 25),
    ("cleanup", 12),
    ("force_unlock", 10),
    ("rollback", 8),
    ("mark_applied", 7),
    ("mark_rolled_back", 3),
]
FINISHED = [("succeeded", 85), ("failed", 6), ("cancelled", 5), ("lost", 4)]
ACTIVE = ["awaiting_approval", "queued", "running"]
ACTIONS = [
    ("operation.requested", 30),
    ("operation.succeeded", 24),
    ("operation.running", 10),
    ("operation.failed", 3),
    ("operation.cancelled", 2),
    ("operation.lost", 1),
    ("operation.approved", 6),
    ("operation.rejected", 1),
    ("operation.expired", 1),
    ("scripts.imported", 12),
    ("target.changed", 6),
    ("target.registered", 3),
    ("target.demo_loaded", 1),
]


def seed(world: World, n: int) -> float:
    """``n`` operations and ``n`` audit events; returns the seconds it took."""
    from django.db import connection

    from migrations_ops.models import AuditEvent, Operation

    start = time.perf_counter()
    users = sql_array(USERS, "text")
    user_ids = sql_array(world.user_ids, "bigint")
    target_ids = sql_array(world.target_ids, "bigint")
    target_names = sql_array(world.target_names, "text")
    t = len(world.target_ids)
    # Busy targets first: the square skews the choice towards the low indexes.
    target_index = f"(1 + floor({t} * r2 * r2)::int)"
    active_index = f"(1 + (i % {t}))"
    user = f"(1 + floor({len(USERS)} * r3)::int)"
    when = (
        f"(now() - interval '{YEARS * 365} days' * (1 - i::float8 / {n}) - interval '1 min' * r5)"
    )
    # Only the newest operation of each target may be active (one active per target).
    is_active = f"(i > {n} - {t})"
    active = sql_array(ACTIVE, "text")
    status = f"(CASE WHEN {is_active} THEN {active}[1 + i % 3] ELSE {weighted('r1', FINISHED)} END)"
    target = f"{target_ids}[CASE WHEN {is_active} THEN {active_index} ELSE {target_index} END]"
    took = "interval '1 s' * (2 + 30 * r1)"
    operations = insert_select(
        Operation,
        {
            "kind": weighted("r4", KINDS),
            "target_id": target,
            "status": status,
            "requested_by_id": f"{user_ids}[{user}]",
            "requested_by_name": f"{users}[{user}]",
            "door": weighted("r6", DOORS),
            "reason": "'scheduled deploy ' || i",
            "params": """'{"release_fresh": false}'::jsonb""",
            "requested_at": when,
            "started_at": f"CASE WHEN {is_active} THEN NULL ELSE {when} + interval '2 s' END",
            "finished_at": f"CASE WHEN {is_active} THEN NULL ELSE {when} + {took} END",
            "worker": "'celery@worker-' || (i % 4)",
            "log": "'took the lock; ran 1 statement; released the lock'",
            "result": """'{"before": {"held": true}, "after": {"held": false}}'::jsonb""",
        },
        random_rows(n, 6),
    )
    # ~2% of events concern no target (none of the seeded actions needs one that badly).
    no_target = "(r2 > 0.98)"
    events = insert_select(
        AuditEvent,
        {
            "created_at": when,
            "actor_id": f"CASE WHEN r6 < 0.05 THEN NULL ELSE {user_ids}[{user}] END",
            "actor_name": f"CASE WHEN r6 < 0.05 THEN 'sweeper' ELSE {users}[{user}] END",
            "door": f"CASE WHEN r6 < 0.05 THEN 'task' ELSE {weighted('r1', DOORS)} END",
            "action": weighted("r4", ACTIONS),
            "target_id": f"CASE WHEN {no_target} THEN NULL ELSE {target_ids}[{target_index}] END",
            "target_name": f"CASE WHEN {no_target} THEN '' ELSE {target_names}[{target_index}] END",
            "operation_id": f"CASE WHEN r4 < 0.78 THEN 1 + floor(r1 * {n})::bigint END",
            "details": """'{"reason": "scheduled deploy"}'::jsonb""",
        },
        random_rows(n, 6),
    )
    with connection.cursor() as cursor:
        cursor.execute("SELECT setseed(0.42)")
        cursor.execute("SET maintenance_work_mem = '512MB'")
        for model, statement in ((Operation, operations), (AuditEvent, events)):
            with without_secondary_indexes(cursor, model._meta.db_table):
                cursor.execute(statement)
    vacuum_analyze([Operation._meta.db_table, AuditEvent._meta.db_table])
    return time.perf_counter() - start


class without_secondary_indexes:
    """Drop a table's indexes that back no constraint, put them back afterwards: a bulk load
    and one build per index beats a million index insertions."""

    def __init__(self, cursor, table: str) -> None:
        self.cursor = cursor
        self.table = table
        self.definitions: list[str] = []

    def __enter__(self):
        self.cursor.execute(
            "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) "
            "FROM pg_index i WHERE i.indrelid = %s::regclass AND NOT EXISTS "
            "(SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
            [self.table],
        )
        rows = self.cursor.fetchall()
        for name, definition in rows:
            self.cursor.execute(f"DROP INDEX {name}")
            self.definitions.append(definition)
        return self

    def __exit__(self, *exc_info) -> None:
        for definition in self.definitions:
            self.cursor.execute(definition)


def vacuum_analyze(tables: list[str]) -> None:
    from django.db import connection

    settings = connection.settings_dict
    with psycopg.connect(
        host=settings["HOST"] or None,
        port=settings["PORT"] or None,
        user=settings["USER"] or None,
        dbname=settings["NAME"],
        autocommit=True,
    ) as conn:
        for table in tables:
            conn.execute(f'VACUUM (ANALYZE) "{table}"')


def use_database(name: str) -> None:
    """Point Django's connection at another of the bench's databases (it reconnects)."""
    from django.db import connection

    connection.close()
    connection.settings_dict["NAME"] = name


# --- the cases ---------------------------------------------------------------------------------
@dataclass
class Case:
    changelist: str  # "operation" or "auditevent"
    label: str
    query: str


def cases(world: World, n: int, per_page: int) -> list[Case]:
    deep = max(1, min(DEEP_PAGE, n // per_page))
    busy = world.target_names[0]
    quiet_id = world.target_ids[7]
    quiet = world.target_names[7]
    year = time.gmtime().tm_year - 1
    return [
        Case("operation", "first page", ""),
        Case("operation", f"deep page (p={deep})", f"p={deep}"),
        Case("operation", "status=failed", "status__exact=failed"),
        Case("operation", "door=cli + target", f"door__exact=cli&target__id__exact={quiet_id}"),
        Case("operation", f"year {year}", f"requested={year}"),
        Case("operation", "search user 'oncall-3'", "q=oncall-3"),
        Case("operation", f"search target '{busy.split('-')[0]}'", f"q={busy.split('-')[0]}"),
        Case("auditevent", "first page", ""),
        Case("auditevent", f"deep page (p={deep})", f"p={deep}"),
        Case("auditevent", "door=cli + target", f"door__exact=cli&target={quiet}"),
        Case("auditevent", "action=operation.failed", "action=operation.failed"),
        Case("auditevent", f"year {year}", f"created={year}"),
        Case("auditevent", f"month {year}-03", f"created={year}-03"),
        Case("auditevent", "user=oncall-3", "user=oncall-3"),
        # A kind common enough to fill a page at both sizes, so the sizes compare like for like.
        Case("auditevent", "user + kind", "user=oncall-3&action=operation.requested"),
        Case("auditevent", "search actor 'oncall-3'", "q=oncall-3"),
        Case("auditevent", f"search target '{quiet.split('-')[0]}'", f"q={quiet.split('-')[0]}"),
    ]


@dataclass
class Figures:
    median: float
    p90: float
    queries: int
    slowest_query_ms: float
    status: int
    shown: str


def timed(client, url: str, runs: int, warmup: int) -> tuple[list[float], int]:
    """Seconds of each of ``runs`` GETs after ``warmup`` untimed ones, and the first status
    other than 200 (200 if none)."""
    for _ in range(warmup):
        client.get(url)
    times = []
    status = 200
    for _ in range(runs):
        start = time.perf_counter()
        response = client.get(url)
        times.append(time.perf_counter() - start)
        status = response.status_code if status == 200 else status
    return times, status


def figures(client, url: str, times: list[float], status: int) -> Figures:
    """The figures of a case: its times, and one more GET under ``CaptureQueriesContext``."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    slowest = max((float(q["time"]) for q in captured.captured_queries), default=0.0)
    shown = ""
    paginator = re.search(r'<p class="paginator">(.*?)</p>', response.content.decode(), re.S)
    if paginator:
        words = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", paginator.group(1)))
        found = re.search(r"(?:about )?[\d,]+ (?:operation|audit event)s?\b", words)
        shown = found.group(0) if found else ""
    return Figures(
        median=statistics.median(times) * 1000,
        p90=harness.percentile(times, 0.9) * 1000,
        queries=len(captured.captured_queries),
        slowest_query_ms=slowest * 1000,
        status=status,
        shown=shown,
    )


def run(args: argparse.Namespace, databases: dict[int, str]) -> bool:
    import django

    django.setup()

    from django.contrib import admin
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import UNUSABLE_PASSWORD_PREFIX
    from django.core.management import call_command
    from django.test import Client
    from django.urls import reverse

    from migrations_ops.models import Operation

    per_page = admin.site.get_model_admin(Operation).list_per_page
    for n, name in databases.items():
        use_database(name)
        call_command("migrate", verbosity=0, interactive=False)
        # Both databases get the same users and targets, with the same ids.
        world = create_world()
        # The same (unusable) password in both, or a session would not survive the switch.
        root = get_user_model().objects.create(
            username="root", is_staff=True, is_superuser=True, password=UNUSABLE_PASSWORD_PREFIX
        )
        seconds = seed(world, n)
        print(f"seeded {n:,} operations and {n:,} audit events in {seconds:.1f} s", file=sys.stderr)
    client = Client()
    gc.freeze()

    # Each case runs at both sizes in turns (ROUNDS blocks each), so that both sizes see the
    # same load from whatever else runs on the machine.
    small, large = args.small_rows, args.rows
    per_round = max(1, -(-args.runs // ROUNDS))
    results: dict[int, list[tuple[Case, Figures]]] = {small: [], large: []}
    for pair in zip(cases(world, small, per_page), cases(world, large, per_page), strict=True):
        times: dict[int, list[float]] = {small: [], large: []}
        status = {small: 200, large: 200}
        for _ in range(ROUNDS):
            for n, case in zip((small, large), pair, strict=True):
                use_database(databases[n])
                client.force_login(root)
                block, block_status = timed(client, url_of(case, reverse), per_round, args.warmup)
                times[n] += block
                status[n] = block_status if status[n] == 200 else status[n]
        for n, case in zip((small, large), pair, strict=True):
            use_database(databases[n])
            client.force_login(root)
            results[n].append((case, figures(client, url_of(case, reverse), times[n], status[n])))
            print(
                f"  {n:>9,} {case.changelist:<10} {case.label:<28} "
                f"{results[n][-1][1].median:7.1f} ms",
                file=sys.stderr,
            )
    return report(args, results)


def url_of(case: Case, reverse) -> str:
    path = reverse(f"admin:migrations_ops_{case.changelist}_changelist")
    return f"{path}?{case.query}" if case.query else path


def report(args: argparse.Namespace, results: dict[int, list[tuple[Case, Figures]]]) -> bool:
    small, large = args.small_rows, args.rows
    print()
    print(
        f"Changelists through Django's test Client as a superuser, median/p90 of "
        f"{ROUNDS * max(1, -(-args.runs // ROUNDS))} requests per case and size (in {ROUNDS} "
        f"blocks alternating between the sizes, each after {args.warmup} warm-up); PostgreSQL, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    header = (
        f"{'changelist':<11}{'case':<30}{'rows':>10}{'median':>9}{'p90':>9}{'queries':>8}"
        f"{'slowest q':>10}{'x small':>8}  shown"
    )
    print(header)
    print("-" * len(header))
    met = True
    small_by_key = {(c.changelist, c.label.split(" (")[0]): f for c, f in results[small]}
    for n in (small, large):
        for case, f in results[n]:
            ratio = ""
            if n == large and small != large:
                base = small_by_key.get((case.changelist, case.label.split(" (")[0]))
                if base:
                    ratio = f"{f.median / base.median:.2f}"
            ok = (
                f.status == 200
                and f.median <= TARGET_MEDIAN_MS
                and f.queries <= TARGET_QUERIES
                and (not ratio or float(ratio) <= TARGET_RATIO)
            )
            if n == large:
                met = met and ok
            mark = "" if f.status == 200 else f" HTTP {f.status}"
            print(
                f"{case.changelist:<11}{case.label:<30}{n:>10,}{f.median:>8.1f} {f.p90:>8.1f} "
                f"{f.queries:>7}{f.slowest_query_ms:>9.1f} {ratio:>7}  {f.shown}{mark}"
                + ("" if n == small or ok else "  <- misses")
            )
    print(
        f"target at {large:,} rows: median <= {TARGET_MEDIAN_MS:g} ms, <= {TARGET_QUERIES} "
        f"queries, median <= {TARGET_RATIO:g}x the same case at {small:,} rows -> "
        f"{'MET' if met else 'NOT MET'}"
    )
    return met


if __name__ == "__main__":
    sys.exit(main())
