"""Target URLs: which database they name, their SQLite path, and how they are shown masked."""

import pytest

from migrations_ops.engine import EngineError, UnsupportedTarget, dialect_of, mask_url
from migrations_ops.engine.target_url import password_of, scrub, sqlite_path

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
            "postgres://ops:***@db.internal/orders?sslmode=require&password=***",
        ),
        (
            f"postgresql://db.internal/orders?user=ops&password={SECRET}",
            "postgresql://db.internal/orders?user=ops&password=***",
        ),
        (
            f"postgresql://db/orders?sslpassword={SECRET}&token={SECRET}&secret={SECRET}"
            f"&api_key={SECRET}&Password={SECRET}&connect_timeout=5",
            "postgresql://db/orders?sslpassword=***&token=***&secret=***&api_key=***"
            "&Password=***&connect_timeout=5",
        ),
        (
            f"https://app.example/health?code={SECRET}&sig={SECRET}&verbose=1",
            "https://app.example/health?code=***&sig=***&verbose=1",
        ),
        # An unencoded & in a query password: what follows it is masked too.
        ("postgresql://db/orders?password=pa&ss", "postgresql://db/orders?password=***&***"),
        # An @ in the query of a URL without a path: not taken for a user name.
        ("postgresql://db?password=pa@ss", "postgresql://***@ss"),
        ("redis://:pa@ss@cache:6379/0", "redis://:***@cache:6379/0"),
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


# Masking parses the URL: a password equal to another part of it masks only the password.
@pytest.mark.parametrize(
    "password", ["port", "postgres", "5432", "@", "%40", "ops", "db", "orders", "***", ":", "p"]
)
def test_mask_url_masks_only_the_password_whatever_it_equals(password):
    url = f"postgresql://ops:{password}@db:5432/orders?sslmode=require&application_name=port"
    assert mask_url(url) == (
        "postgresql://ops:***@db:5432/orders?sslmode=require&application_name=port"
    )


@pytest.mark.parametrize(
    ("password", "message", "scrubbed"),
    [
        # The words of a message stay whole whatever the password is part of.
        ("p", "invalid port number", "invalid port number"),
        ("ort", "invalid port number", "invalid port number"),
        ("543", 'port "5432" failed', 'port "5432" failed'),
        # libpq quotes what it echoes: a quoted value holding the password goes.
        ("pa%zz", 'invalid percent-encoded token: "pa%zz"', 'invalid percent-encoded token: "***"'),
        ("port", 'invalid value for option "port"', 'invalid value for option "***"'),
        # A URL echoed in the message is masked by parsing it.
        (
            "port",
            'unexpected character at position 9 in URI: "postgresql://ops:port@db:5432/x"',
            'unexpected character at position 9 in URI: "postgresql://ops:***@db:5432/x"',
        ),
        ("s3cr3t", "in postgresql://ops:s3cr3t@db:5432/x", "in postgresql://ops:***@db:5432/x"),
        ("s3cr3t", 'missing "=" after "ops:s3cr3t@db" in', 'missing "=" after "***" in'),
        # The password as a word of its own, and percent-decoded.
        ("s3cr3t", "password s3cr3t refused", "password *** refused"),
        ("pa%40ss", "password pa@ss refused", "password *** refused"),
    ],
)
def test_scrub_removes_the_password_from_a_driver_message_without_mangling_it(
    password, message, scrubbed
):
    assert scrub(message, f"postgresql://ops:{password}@db:5432/orders") == scrubbed


def test_scrub_removes_password_like_query_values_too():
    url = "postgresql://ops@db/orders?sslmode=require&sslpassword=k3y-pass"
    assert scrub('could not decrypt key with "k3y-pass"', url) == 'could not decrypt key with "***"'


def test_scrub_leaves_a_message_alone_when_the_url_has_no_password():
    message = 'could not translate host name "db" to address'
    assert scrub(message, "postgresql://ops@db/orders") == message


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
