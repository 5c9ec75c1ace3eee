import os

import pytest

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
