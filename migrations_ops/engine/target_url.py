"""Connection URLs of targets: which database they name, and how to show them without secrets."""

import re

from .errors import UnsupportedTarget

POSTGRESQL_SCHEMES = {"postgres", "postgresql", "pgsql"}
SQLITE_SCHEMES = {"sqlite"}


def scheme_of(url: str) -> str:
    """The URL's scheme as written, or "" when it has none. Never raises: unlike ``urlsplit``
    it does not parse the rest, which may be malformed (``postgresql://u@[::1/db``)."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", url)
    return match.group(1) if match else ""


def dialect_of(url: str) -> str:
    """Return ``"postgresql"`` or ``"sqlite"`` for a target URL, or raise ``UnsupportedTarget``."""
    scheme = scheme_of(url).lower()
    if scheme in POSTGRESQL_SCHEMES:
        if not url[len(scheme) :].startswith("://"):
            # libpq would read it as a key=value string and echo all of it, password included.
            raise UnsupportedTarget(
                "a PostgreSQL target URL looks like postgresql://user@host:port/db"
            )
        return "postgresql"
    if scheme in SQLITE_SCHEMES:
        return "sqlite"
    raise UnsupportedTarget(
        f"unsupported target URL scheme {scheme + '://' if scheme else '(none)'}: "
        "use postgresql://user@host:port/db or sqlite:///path/to/file.sqlite3"
    )


def libpq_url(url: str) -> str:
    """The URL as libpq accepts it: libpq knows only a lower-case postgresql:// or postgres://
    prefix and reads anything else (pgsql://, POSTGRESQL://) as a key=value string."""
    _, separator, rest = url.partition("://")
    return f"postgresql://{rest}" if separator else url


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    _, separator, path = url.partition("://")
    if not separator or not path.startswith("/") or path == "/":
        raise UnsupportedTarget("a SQLite target URL looks like sqlite:///path/to/file.sqlite3")
    return path[1:]


def split_credentials(url: str) -> tuple[str, str | None]:
    """The URL without its ``user:password@`` part, and that part (None when it has none).

    The credentials are read as libpq reads them: up to the ``@`` before the first ``/`` after
    ``scheme://``. So a ``#`` or ``?`` in an unencoded password stays in the password, where
    ``urlsplit`` would take it for the start of a fragment or query and miss the password.
    """
    head, separator, rest = url.partition("://")
    authority = rest.split("/", 1)[0]
    if not separator or "@" not in authority:
        return url, None
    userinfo = authority.rsplit("@", 1)[0]
    return f"{head}://{rest[len(userinfo) + 1 :]}", userinfo


def mask_url(url: str) -> str:
    """The URL with its password (and any query string, which may hold one) replaced by ***."""
    without_credentials, userinfo = split_credentials(url)
    head, separator, rest = without_credentials.partition("://")
    if not separator:
        return "***" if "@" in url else re.split(r"[?#]", url, maxsplit=1)[0]
    location, mark, tail = [*re.split(r"([?#])", rest, maxsplit=1), "", ""][:3]
    has_query = mark == "?" and tail.split("#", 1)[0] != ""
    if userinfo is not None:
        user = userinfo.split(":", 1)[0]
        location = f"{user}:***@{location}" if ":" in userinfo else f"{user}@{location}"
    return f"{head}://{location}{'?***' if has_query else ''}"


def password_of(url: str) -> str | None:
    """The password as written in the URL (to scrub it from driver messages), or None."""
    _, userinfo = split_credentials(url)
    if userinfo is None or ":" not in userinfo:
        return None
    return userinfo.split(":", 1)[1]
