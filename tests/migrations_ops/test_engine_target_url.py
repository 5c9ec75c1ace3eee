"""Target URLs: which database they name, their SQLite path, and how they are shown masked."""

import pytest

from migrations_ops.engine import EngineError, UnsupportedTarget, dialect_of, mask_url
from migrations_ops.engine.target_url import password_of, sqlite_path

SECRET = "s3cr3t-Pa55"


# --- dialect_of ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "dialect"),
    [
        ("postgresql://ops@db.internal:5432/orders", "postgresql"),
        ("postgres://ops@db.internal/orders", "postgresql"),
        ("pgsql://ops@db.internal/orders", "postgresql"),
        ("PostgreSQL://ops@db.internal/orders", "postgresql"),
        ("sqlite:///data/app.sqlite3", "sqlite"),
        ("sqlite:////var/lib/app.sqlite3", "sqlite"),
        ("SQLITE:///data/app.sqlite3", "sqlite"),
    ],
)
def test_dialect_of_supported_schemes(url, dialect):
    assert dialect_of(url) == dialect


@pytest.mark.parametrize(
    ("url", "named"),
    [
        (f"mysql://root:{SECRET}@db.internal/orders", "mysql://"),
        (f"mssql+pyodbc://sa:{SECRET}@db.internal/orders", "mssql+pyodbc://"),
        ("http://example.com/db", "http://"),
        ("/var/lib/app.sqlite3", "(none)"),
        ("app.sqlite3", "(none)"),
        ("", "(none)"),
    ],
)
def test_dialect_of_unsupported_scheme_is_one_line_error_naming_the_scheme(url, named):
    with pytest.raises(UnsupportedTarget) as raised:
        dialect_of(url)
    message = str(raised.value)
    assert isinstance(raised.value, EngineError)
    assert f"unsupported target URL scheme {named}:" in message
    assert "postgresql://" in message  # says what would work
    assert "\n" not in message
    assert SECRET not in message


def test_dialect_of_malformed_url_of_known_scheme_does_not_raise_value_error():
    # urlsplit raises ValueError on an unclosed IPv6 bracket; the engine must not.
    assert dialect_of(f"postgresql://ops:{SECRET}@[::1/orders") == "postgresql"


@pytest.mark.parametrize("url", [f"postgresql:ops:{SECRET}@db/orders", "postgres:db"])
def test_dialect_of_postgres_scheme_without_slashes_is_refused(url):
    # libpq would read such a string as key=value pairs and echo all of it in its error.
    with pytest.raises(UnsupportedTarget) as raised:
        dialect_of(url)
    assert "postgresql://user@host:port/db" in str(raised.value)
    assert SECRET not in str(raised.value)


# --- mask_url --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            f"postgresql://ops:{SECRET}@db.internal:5432/orders",
            "postgresql://ops:***@db.internal:5432/orders",
        ),
        (
            f"postgres://ops:{SECRET}@db.internal/orders?sslmode=require&password={SECRET}",
            "postgres://ops:***@db.internal/orders?***",
        ),
        (
            f"postgresql://db.internal/orders?user=ops&password={SECRET}",
            "postgresql://db.internal/orders?***",
        ),
        # Characters that are common in generated passwords and often left unencoded.
        ("postgresql://ops:pa@ss@db.internal/orders", "postgresql://ops:***@db.internal/orders"),
        ("postgresql://ops:pa#ss@db.internal/orders", "postgresql://ops:***@db.internal/orders"),
        ("postgresql://ops:pa?ss@db.internal/orders", "postgresql://ops:***@db.internal/orders"),
        ("postgresql://ops:pa:ss@db.internal/orders", "postgresql://ops:***@db.internal/orders"),
        ("postgresql://ops:pa%23ss@db.internal/orders", "postgresql://ops:***@db.internal/orders"),
    ],
)
def test_mask_url_hides_password_and_query(url, masked):
    assert mask_url(url) == masked
    for secret in (SECRET, "pa@ss", "pa#ss", "pa?ss", "pa:ss", "pa%23ss", "ss@"):
        assert secret not in mask_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://ops@db.internal:5432/orders",
        "postgresql://db.internal/orders",
        "postgres://ops@10.0.0.7:6543/orders",
        "sqlite:///data/app.sqlite3",
        "sqlite:////var/lib/app.sqlite3",
    ],
)
def test_mask_url_keeps_urls_without_secrets_unchanged(url):
    # User, host, port, database, and a SQLite file's relative or absolute path are kept as is.
    assert mask_url(url) == url


def test_mask_url_drops_fragment():
    assert mask_url(f"postgresql://ops@db/orders#{SECRET}") == "postgresql://ops@db/orders"


def test_mask_url_never_raises_nor_leaks_on_malformed_url():
    # urlsplit raises ValueError on an unclosed IPv6 bracket.
    assert SECRET not in mask_url(f"postgresql://ops:{SECRET}@[::1/orders")


# --- password_of: what is scrubbed from driver messages ---------------------------------------
@pytest.mark.parametrize(
    ("url", "password"),
    [
        (f"postgresql://ops:{SECRET}@db/orders", SECRET),
        ("postgresql://ops:pa#ss@db/orders", "pa#ss"),
        ("postgresql://ops:pa?ss@db/orders", "pa?ss"),
        ("postgresql://ops:pa@ss@db/orders", "pa@ss"),
        ("postgresql://ops@db/orders", None),
        ("postgresql://db/orders?password=x", None),
        ("sqlite:///data/app.sqlite3", None),
    ],
)
def test_password_of(url, password):
    assert password_of(url) == password


# --- sqlite_path -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///data/app.sqlite3", "data/app.sqlite3"),
        ("sqlite:///app.sqlite3", "app.sqlite3"),
        ("sqlite:////var/lib/app.sqlite3", "/var/lib/app.sqlite3"),
    ],
)
def test_sqlite_path(url, path):
    assert sqlite_path(url) == path


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "sqlite://app.sqlite3",
        "sqlite://host/app.sqlite3",
        "sqlite:app.sqlite3",
        "sqlite:/app.sqlite3",
    ],
)
def test_sqlite_path_errors(url):
    with pytest.raises(UnsupportedTarget) as raised:
        sqlite_path(url)
    message = str(raised.value)
    assert message == "a SQLite target URL looks like sqlite:///path/to/file.sqlite3"
