"""Connection URLs of targets: which database they name, and how to show them without secrets."""

import re
from urllib.parse import unquote

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


# Query parameters whose value is a secret (libpq's password and sslpassword, and the tokens,
# keys and signatures of other URLs shown masked: health URLs such as an Azure function's
# ?code=, a signed ?sig=; the console's own Redis and broker URLs). Masking more is harmless.
SECRET_PARAMETER = re.compile(
    r"pass|pwd|secret|token|key|auth|cred|sig|code|session|jwt|bearer|private", re.I
)
MASK = "***"


def mask_url(url: str) -> str:
    """The URL with its secrets replaced by ***, found by parsing it: the password of its
    ``user:password@`` part and the value of every password-like query parameter (password=,
    sslpassword=, token=, api_key=, ...). The rest is kept as written; a fragment is dropped.
    The password's text is never searched for, so a password equal to "port" or "5432"
    leaves the port and the rest of the URL as they are."""
    without_credentials, userinfo = split_credentials(url)
    head, separator, rest = without_credentials.partition("://")
    if not separator:
        # Not a URL with an authority (a libpq key=value string, a bare word): nothing to
        # parse a password out of, so anything after an @ or a ? may be one.
        return MASK if "@" in url else re.split(r"[?#]", url, maxsplit=1)[0]
    location, mark, tail = [*re.split(r"([?#])", rest, maxsplit=1), "", ""][:3]
    query = tail.split("#", 1)[0] if mark == "?" else ""
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        if re.search(r"[?#&=]", user):
            # Not a user name: a query with an @ in it (libpq would take it for one).
            user, colon = MASK, ""
        location = f"{user}:{MASK}@{location}" if colon else f"{user}@{location}"
    return f"{head}://{location}{'?' + mask_query(query) if query else ''}"


def mask_query(query: str) -> str:
    """A query string with the value of each password-like parameter replaced by ***; a
    piece without a name (what follows an unencoded & in a value) is masked too."""
    masked = []
    for parameter in query.split("&"):
        name, equals, _ = parameter.partition("=")
        if not equals and parameter:
            parameter = MASK
        elif equals and SECRET_PARAMETER.search(unquote(name)):
            parameter = f"{name}={MASK}"
        masked.append(parameter)
    return "&".join(masked)


# A URL with an authority inside some text, up to whitespace or a quote.
URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"']+")


def mask_urls_in(text: str) -> str:
    """``text`` with every URL in it masked by ``mask_url``."""
    return URL_IN_TEXT.sub(lambda match: mask_url(match.group(0)), text)


def scrub(text: str, url: str) -> str:
    """A message about ``url`` (a driver's error) without its secrets. Every URL in it is
    masked by ``mask_url``; a double-quoted value holding the password (libpq quotes what it
    echoes: ``invalid percent-encoded token: "..."``) becomes "***"; the password anywhere
    else goes where it is a word of its own, never as part of one ("invalid port" stays)."""
    secrets = {form for secret in secrets_of(url) for form in (secret, unquote(secret))} - {""}
    words = [
        re.compile(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])")
        for secret in sorted(secrets, key=len, reverse=True)
    ]

    def quoted(match: re.Match) -> str:
        value = match.group(1)
        if "://" in value:
            return f'"{mask_url(value)}"'
        return f'"{MASK}"' if any(word.search(value) for word in words) else match.group(0)

    text = mask_urls_in(text)
    text = re.sub(r'"([^"]*)"', quoted, text)
    for word in words:
        text = word.sub(MASK, text)
    return text


def secrets_of(url: str) -> list[str]:
    """The secrets written in the URL: its password and its password-like query values."""
    password = password_of(url)
    _, userinfo = split_credentials(url)
    rest = url.partition("://")[2][len(userinfo) + 1 if userinfo is not None else 0 :]
    query = rest.partition("?")[2].split("#", 1)[0]
    values = [
        value
        for name, equals, value in (parameter.partition("=") for parameter in query.split("&"))
        if equals and SECRET_PARAMETER.search(unquote(name))
    ]
    return ([password] if password else []) + values


def password_of(url: str) -> str | None:
    """The password as written in the URL (to scrub it from driver messages), or None."""
    _, userinfo = split_credentials(url)
    if userinfo is None or ":" not in userinfo:
        return None
    return userinfo.split(":", 1)[1]
