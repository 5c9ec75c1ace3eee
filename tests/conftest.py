import contextlib
import json
import os
import uuid

import pytest
import redis

from tests.targets import (
    create_pg_database,
    drop_pg_database,
    drop_pg_schema,
    new_pg_schema,
    new_sqlite_target,
)


@pytest.fixture(scope="session")
def targets_database_url():
    """A scratch PostgreSQL database holding target schemas, apart from the console's own."""
    name = f"opsconsole_targets_{os.getpid()}"
    url = create_pg_database(name)
    yield url
    drop_pg_database(name)


@pytest.fixture
def pg_target(targets_database_url):
    """An empty PostgreSQL target (its own schema)."""
    target = new_pg_schema(targets_database_url)
    yield target
    drop_pg_schema(target)


@pytest.fixture
def sqlite_target(tmp_path):
    """An empty SQLite target file."""
    return new_sqlite_target(tmp_path)


@pytest.fixture(params=["postgresql", "sqlite"])
def any_target(request):
    """The same test against a PostgreSQL target and a SQLite target."""
    return request.getfixturevalue(
        "pg_target" if request.param == "postgresql" else "sqlite_target"
    )


@pytest.fixture(scope="session")
def celery_worker_process(django_db_setup, django_db_blocker, tmp_path_factory):
    """A real worker process on Redis, pointed at the test database (session-wide)."""
    from django.conf import settings

    from tests.worker import celery_worker, database_url

    queue = settings.CELERY_TASK_DEFAULT_QUEUE
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with celery_worker(
        database_url=database_url(settings.DATABASES["default"]),
        redis_url=settings.CELERY_BROKER_URL,
        queue=queue,
        log_path=log_path,
    ) as process:
        yield {"process": process, "queue": queue, "log_path": log_path}


@pytest.fixture
def real_worker(celery_worker_process, settings):
    """Send tasks through Redis to the real worker instead of running them in-process."""
    from opsconsole.celery import app

    settings.CELERY_TASK_ALWAYS_EAGER = False
    app.conf.task_always_eager = False
    yield celery_worker_process
    app.conf.task_always_eager = True


@pytest.fixture
def own_queue(settings):
    """Tasks go through Redis to a queue of this test's own, which no worker consumes until the
    test starts one on it (``start_worker``). Its messages are removed afterwards, including
    those a killed worker left unacknowledged."""
    from opsconsole.celery import app

    queue = f"{settings.CELERY_TASK_DEFAULT_QUEUE}-{uuid.uuid4().hex[:8]}"
    saved = app.conf.task_always_eager, app.conf.task_default_queue
    app.conf.task_always_eager, app.conf.task_default_queue = False, queue
    yield queue
    app.conf.task_always_eager, app.conf.task_default_queue = saved
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    for key in [*client.scan_iter(match=f"{queue}*"), f"_kombu.binding.{queue}"]:
        client.delete(key)
    for tag, payload in client.hgetall("unacked").items():
        if json.loads(payload)[2] == queue:  # [message, exchange, routing key]
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
    client.close()


@pytest.fixture
def start_worker(own_queue, settings, tmp_path):
    """``start_worker()`` starts a real worker process on this test's own queue, one the test
    may kill (the session's shared worker must live on), its audit events witnessed where
    this test's are."""
    from tests.worker import celery_worker, database_url

    with contextlib.ExitStack() as stack:

        def start():
            log_path = tmp_path / "own-worker.log"
            process = stack.enter_context(
                celery_worker(
                    database_url=database_url(settings.DATABASES["default"]),
                    redis_url=settings.CELERY_BROKER_URL,
                    queue=own_queue,
                    log_path=log_path,
                    witness_path=settings.AUDIT_WITNESS_PATH,
                )
            )
            return process, log_path

        yield start


@pytest.fixture
def start_beat(own_queue, settings, tmp_path):
    """``start_beat()`` starts a real ``celery beat`` process on the test database, every
    schedule entry due each second, its tasks sent to this test's own queue (no worker there
    unless the test starts one), its audit events witnessed where this test's are. Yields its
    log's path."""
    from tests.worker import celery_beat, database_url

    with contextlib.ExitStack() as stack:
        started = []

        def start():
            log_path = tmp_path / f"beat-{len(started)}.log"
            stack.enter_context(
                celery_beat(
                    database_url=database_url(settings.DATABASES["default"]),
                    redis_url=settings.CELERY_BROKER_URL,
                    queue=own_queue,
                    log_path=log_path,
                    witness_path=settings.AUDIT_WITNESS_PATH,
                )
            )
            started.append(log_path)
            return log_path

        yield start


@pytest.fixture
def roles(db):
    """The console's groups. A data migration creates them, but a transactional test's flush
    empties every table, so tests that need them make sure they are there."""
    from django.apps import apps
    from django.contrib.contenttypes.models import ContentType

    from migrations_ops.roles import sync_roles

    ContentType.objects.clear_cache()  # ids cached before a flush point at deleted rows
    sync_roles(apps)


@pytest.fixture
def health_server():
    """A real local HTTP server (tests/health_server.py): /ok 200, /down 503, /slow 200 after
    SLOW_SECONDS, /moved a redirect to /ok. Yields its base URL."""
    from tests.health_server import serve

    with serve() as url:
        yield url


@pytest.fixture
def own_redis():
    """A redis-server of this test's own (tests/redis_server.py), killed at the end."""
    from tests.redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def cache_on_redis(settings):
    """Point the console's cache at a Redis URL, as the settings do when deployed (short
    time-outs; CACHE_RETRY_SECONDS shortened so a test sees Redis come back quickly)."""

    def point(url: str, *, retry_seconds: float = 0.3) -> None:
        settings.CACHES = {  # changing it drops every cache object made so far
            "default": {
                "BACKEND": "opsconsole.cache.DegradingRedisCache",
                "LOCATION": url,
                "KEY_PREFIX": "opsconsole-test",
                "RETRY_SECONDS": retry_seconds,
                "OPTIONS": {
                    "socket_connect_timeout": settings.CACHE_SOCKET_TIMEOUT,
                    "socket_timeout": settings.CACHE_SOCKET_TIMEOUT,
                },
            }
        }

    return point


@pytest.fixture(scope="session", autouse=True)
def flush_past_append_only_triggers():
    """A transactional test's flush empties every table with TRUNCATE, which the history
    tables refuse (opsconsole/append_only.py): the test database's owner flushes with
    triggers off, as only a superuser can."""
    from django.db.backends.postgresql.operations import DatabaseOperations

    flush = DatabaseOperations.execute_sql_flush

    def flush_with_triggers_off(self, sql_list):
        with self.connection.cursor() as cursor:
            cursor.execute("SET session_replication_role = replica")
        try:
            flush(self, sql_list)
        finally:
            with self.connection.cursor() as cursor:
                cursor.execute("SET session_replication_role = DEFAULT")

    DatabaseOperations.execute_sql_flush = flush_with_triggers_off
    yield
    DatabaseOperations.execute_sql_flush = flush


@pytest.fixture(autouse=True)
def audit_witness_of_this_test(settings, tmp_path_factory):
    """Each test's audit chain starts empty: so does its witness (migrations_ops/audit_witness)."""
    settings.AUDIT_WITNESS_PATH = tmp_path_factory.mktemp("witness") / "audit-witness.json"
