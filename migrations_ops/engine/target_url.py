"""Connection URLs of targets: which database they name, and how to show them without secrets."""

from urllib.parse import urlsplit, urlunsplit

from .errors import UnsupportedTarget

POSTGRESQL_SCHEMES = {"postgres", "postgresql", "pgsql"}
SQLITE_SCHEMES = {"sqlite"}


def dialect_of(url: str) -> str:
    """Return ``"postgresql"`` or ``"sqlite"`` for a target URL, or raise ``UnsupportedTarget``."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in POSTGRESQL_SCHEMES:
        return "postgresql"
    if scheme in SQLITE_SCHEMES:
        return "sqlite"
    raise UnsupportedTarget(
        f"unsupported target URL scheme {scheme + '://' if scheme else '(none)'}: "
        "use postgresql://user@host:port/db or sqlite:///path/to/file.sqlite3"
    )


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    path = url.split("://", 1)[1]
    if not path.startswith("/") or path == "/":
        raise UnsupportedTarget("a SQLite target URL looks like sqlite:///path/to/file.sqlite3")
    return path[1:]


def mask_url(url: str) -> str:
    """The URL with its password (and any query string, which may hold one) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = "***" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def password_of(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None
