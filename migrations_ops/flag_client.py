"""How an application reads the flags its auto-migrator obeys, honouring MIGRATION_CACHE_TTL.

The last answer (flags, ETag, when it was fetched) is kept in a small JSON file per target. Until
its TTL has passed the flags are read from that file; after it, the console is asked again (with
``If-None-Match``, so an unchanged answer is a 304). When the console cannot be reached the
cached flags are used, and said to be; with nothing cached the migrator must not run at all.

Standard library only and no Django, so an application can copy this module as it is.

Over HTTP (``http_fetcher``) the token goes to the console's origin only: a redirect within it
is followed, one to another scheme, host or port is refused and said, never followed with the
token or without it (flags from elsewhere are not the console's). ``timeout`` bounds the whole
request, not each socket operation: a console, or anything on the way, that sends a byte at a
time is cut off when it runs out (``_Deadline``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FLAG_NAMES = (
    "AUTO_MIGRATE",
    "MIGRATION_DRY_RUN",
    "MIGRATION_MAX_RETRIES",
    "MIGRATION_LOCK_TIMEOUT",
    "MIGRATION_CACHE_TTL",
    "EMERGENCY_BYPASS",
)
BOOLEAN_FLAGS = ("AUTO_MIGRATE", "MIGRATION_DRY_RUN", "EMERGENCY_BYPASS")
DEFAULT_TIMEOUT_SECONDS = 5.0


class FlagsUnavailable(Exception):
    """The flags could not be read and none are cached: the migrator must not run."""


class ConsoleUnreachable(Exception):
    """No answer from the console (network, time-out, 5xx): cached flags may stand in."""


@dataclass(frozen=True)
class Fetched:
    """A console answer: ``flags`` None means 304 (the cached flags are still current)."""

    flags: dict | None
    etag: str = ""
    max_age: int | None = None


# A fetcher asks the console once, given the cached ETag (or ""), or raises ConsoleUnreachable.
Fetcher = Callable[[str], Fetched]


@dataclass(frozen=True)
class FlagReading:
    flags: dict
    origin: str  # "console", "console (not modified)", "cache", "cache (console unreachable)"
    fetched_at: float
    note: str = ""  # why cached flags stand in, when they do


def validate_flags(flags: object) -> dict:
    """The six flags, each of its kind; anything else is refused rather than guessed."""
    if not isinstance(flags, dict):
        raise FlagsUnavailable("the console's answer holds no flags object")
    missing = [name for name in FLAG_NAMES if name not in flags]
    if missing:
        raise FlagsUnavailable(f"the console's answer lacks {', '.join(missing)}")
    for name in FLAG_NAMES:
        value = flags[name]
        wanted = bool if name in BOOLEAN_FLAGS else int
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise FlagsUnavailable(f"the console's answer has {name}={value!r}, not a {wanted}")
    return {name: flags[name] for name in FLAG_NAMES}


class FlagCache:
    """One JSON file: the flags of one target from one source, with their ETag and age."""

    def __init__(self, path: Path | str, *, source: str, target: str):
        self.path = Path(path)
        self.source = source
        self.target = target

    def load(self) -> dict | None:
        try:
            entry = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # missing or half-written: as if nothing were cached
        if not isinstance(entry, dict) or (entry.get("source"), entry.get("target")) != (
            self.source,
            self.target,
        ):
            return None
        try:
            entry["flags"] = validate_flags(entry.get("flags"))
            entry["fetched_at"] = float(entry["fetched_at"])
        except (FlagsUnavailable, KeyError, TypeError, ValueError):
            return None
        return entry

    def save(self, flags: dict, *, etag: str, max_age: int | None, fetched_at: float) -> None:
        entry = {
            "source": self.source,
            "target": self.target,
            "flags": flags,
            "etag": etag,
            "max_age": max_age,
            "fetched_at": fetched_at,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Several instances of an application may start at once: write aside, then rename, so
        # a reader sees the old file or the new one, never half of one.
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(handle, "w") as file:
                json.dump(entry, file)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def ttl_of(entry: dict) -> float:
    max_age = entry.get("max_age")
    if isinstance(max_age, int) and max_age >= 0:
        return max_age
    return entry["flags"]["MIGRATION_CACHE_TTL"]


def read_flags(
    cache: FlagCache, fetch: Fetcher, *, clock: Callable[[], float] = time.time
) -> FlagReading:
    """The flags to obey now: cached while fresh, else asked for (conditionally)."""
    cached = cache.load()
    now = clock()
    if cached is not None and now - cached["fetched_at"] < ttl_of(cached):
        return FlagReading(cached["flags"], "cache", cached["fetched_at"])
    try:
        answer = fetch(cached["etag"] if cached else "")
    except ConsoleUnreachable as error:
        if cached is None:
            raise FlagsUnavailable(
                f"{error}; no flags are cached: refusing to migrate without knowing them"
            ) from None
        age = int(now - cached["fetched_at"])
        return FlagReading(
            cached["flags"],
            "cache (console unreachable)",
            cached["fetched_at"],
            note=f"{error}; using the flags cached {age} s ago",
        )
    if answer.flags is None:
        if cached is None:
            raise FlagsUnavailable("the console answered 304 Not Modified to a first request")
        flags, etag = cached["flags"], answer.etag or cached["etag"]
        origin = "console (not modified)"
    else:
        flags, etag, origin = validate_flags(answer.flags), answer.etag, "console"
    note = ""
    try:
        cache.save(flags, etag=etag, max_age=answer.max_age, fetched_at=now)
    except OSError as error:  # the flags are known; only the next start will ask again
        note = f"could not keep the flags in {cache.path}: {error}"
    return FlagReading(flags, origin, now, note=note)


def flags_url(console_url: str, target: str) -> str:
    return f"{console_url.rstrip('/')}/api/targets/{urllib.parse.quote(target, safe='')}/flags"


def http_fetcher(
    console_url: str, token: str, target: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> Fetcher:
    """Ask ``GET /api/targets/<name>/flags`` with the application's API token, within
    ``timeout`` seconds in all."""
    if urllib.parse.urlsplit(console_url).scheme not in ("http", "https"):
        raise FlagsUnavailable(f"the console URL must be http(s)://…, not {console_url!r}")
    url = flags_url(console_url, target)

    def fetch(etag: str) -> Fetched:
        asked = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        # urllib also opens file: and ftp: URLs; only HTTP is asked (hence the S310 waiver).
        request = urllib.request.Request(url, headers=asked)  # noqa: S310
        if etag:
            request.add_header("If-None-Match", etag)
        with _Deadline(timeout) as deadline:
            opener = urllib.request.build_opener(
                _SameOriginRedirects, _WatchedHTTPHandler(deadline), _WatchedHTTPSHandler(deadline)
            )
            try:
                return _ask(opener, request, timeout)
            except Exception:
                if deadline.passed:  # whatever the cut-off connection said, this is why
                    raise ConsoleUnreachable(
                        f"the console did not answer within {timeout:g} s at {url}"
                    ) from None
                raise

    return fetch


def _ask(opener: urllib.request.OpenerDirector, request: urllib.request.Request, timeout: float):
    url = request.full_url
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read()
            headers = response.headers
    except urllib.error.HTTPError as error:
        if error.code == 304:
            return Fetched(None, error.headers.get("ETag", ""), _max_age(error.headers))
        if error.code >= 500:
            raise ConsoleUnreachable(f"the console answered {error.code} at {url}") from None
        # A refusal (bad token, no scope, unknown target) is an answer, not an outage:
        # flags cached under an old token must not keep the migrator going.
        raise FlagsUnavailable(
            f"the console refused to give the flags ({error.code}): {_error_message(error)}"
        ) from None
    except _CrossOriginRedirect as redirect:
        raise FlagsUnavailable(
            f"the console at {url} redirected to {redirect.origin}, another origin: the token "
            "is not sent there (give the console's own URL)"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise ConsoleUnreachable(f"the console is unreachable at {url} ({reason})") from None
    try:
        answer = json.loads(body)
    except ValueError:
        raise FlagsUnavailable(f"the console's answer at {url} is not JSON") from None
    flags = answer.get("flags") if isinstance(answer, dict) else None
    return Fetched(validate_flags(flags), headers.get("ETag", ""), _max_age(headers))


# --- the token stays with the console --------------------------------------------------------
class _CrossOriginRedirect(Exception):
    def __init__(self, origin: str):
        super().__init__(origin)
        self.origin = origin


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:  # not a port: no origin the token could belong to
        port = -1
    return scheme, (parts.hostname or ""), port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect within the request's origin (scheme, host, port), headers and token
    with it; refuses any other, where urllib would have carried the token along."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != _origin(req.full_url):
            scheme, host, port = _origin(newurl)
            raise _CrossOriginRedirect(f"{scheme}://{host}:{port}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# --- one deadline for the whole request ------------------------------------------------------
class _Deadline:
    """``seconds`` for a whole request. urllib's time-out is per socket operation, so a byte
    now and then would keep a request going for ever: a timer shuts down the request's
    connections when the time is up, which ends any read or write blocked on them."""

    def __init__(self, seconds: float):
        self.passed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.passed = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shut(sock)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if not self.passed:
                self._sockets.append(sock)
                return
        _shut(sock)  # connected after the deadline: not to be used

    def connection_class(self, base: type[http.client.HTTPConnection]):
        deadline = self

        class Watched(base):
            def connect(self):
                super().connect()
                deadline.watch(self.sock)

        return Watched


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also under TLS: it wakes the blocked reader in the other
    # thread at once, without a TLS goodbye to a peer that is not listening.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watched:
    """A urllib handler whose connections the deadline can end."""

    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(self._deadline.connection_class(http_class), req, **kwargs)


class _WatchedHTTPHandler(_Watched, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPSHandler(_Watched, urllib.request.HTTPSHandler):
    pass


def _max_age(headers) -> int | None:
    match = re.search(r"max-age=(\d+)", headers.get("Cache-Control", "") or "")
    return int(match.group(1)) if match else None


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        message = json.loads(error.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        message = error.reason
    return str(message)
