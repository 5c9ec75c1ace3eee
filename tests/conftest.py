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
    return request.getfixturevalue("pg_target" if request.param == "postgresql" else "sqlite_target")
