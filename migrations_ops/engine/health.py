"""Ask an application's health endpoint whether it responds: one HTTP GET, bounded in time.

It lives in the engine because, like the rest of the engine, it reaches out to a target's
systems and imports nothing from Django; the incidents checklist (``API endpoints responding``)
is its first user. What it reports names the URL masked (``mask_url``): a health URL may carry
a token.

A health URL is typed by a person, so it is treated as hostile:

- **Destinations.** Every connection (the first and each redirect's) goes through
  ``_GuardedBackend``: the host name is resolved once, every address it resolves to must be
  allowed by the ``DestinationPolicy``, and the socket is opened to that checked address (never
  resolved again, so a name that changes its answer between the check and the connection gains
  nothing). Loopback, link-local (cloud metadata), private, shared, multicast, reserved and
  unspecified addresses are refused unless an allowed network covers them.
- **One deadline** for the whole check: resolution, connection, TLS, headers, body and every
  redirect share ``timeout`` seconds (``_Deadline``); each socket operation gets only what is
  left, so an endpoint sending a byte at a time is cut when it runs out.
- **Credentials** (``user:password@`` in the URL) go to the URL's own origin only: redirects
  are followed here, at most ``MAX_REDIRECTS``, and ``Authorization`` is left off any request to
  another scheme, host or port.
- **Short, uniform errors**: a refused destination, a closed port and a filtered one are each
  told in a few fixed words, so the answer cannot serve as a port scanner.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpcore
import httpx

from .target_url import mask_url

USER_AGENT = "opsconsole-health-check"
MAX_REDIRECTS = 5
# Enough of a body to know the endpoint sends one; the rest is not waited for.
MAX_BODY_BYTES = 64 * 1024
# Health checks run at once, each in a thread of its own: more targets than this wait.
MAX_CONCURRENT_PROBES = 16
DEFAULT_PORTS = {"http": 80, "https": 443}

REFUSED = "refused by the destination policy"
UNRESOLVED = "could not be resolved"
UNREACHABLE = "could not be reached"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# IPv6 forms that carry an IPv4 address a gateway would forward to (NAT64's well-known prefix).
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True)
class HealthAnswer:
    """What a health endpoint answered: ``status`` is None when no HTTP answer came."""

    url: str  # masked
    status: int | None
    elapsed_ms: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def describe(self) -> str:
        if self.status is not None:
            return f"{self.url} answered {self.status} in {self.elapsed_ms} ms"
        return f"{self.url} {self.error}"


@dataclass(frozen=True)
class DestinationPolicy:
    """Which addresses a health check may connect to: public (globally routable, unicast)
    ones, and any in ``allowed_networks``."""

    allowed_networks: tuple[Network, ...] = ()

    @classmethod
    def allowing(cls, networks: Iterable[str]) -> DestinationPolicy:
        """From CIDRs such as ``127.0.0.0/8`` (ValueError for one that is not)."""
        return cls(tuple(ipaddress.ip_network(text.strip(), strict=False) for text in networks))

    def permits(self, address: Address) -> bool:
        return all(self._permits_one(each) for each in _embedded(address))

    def _permits_one(self, address: Address) -> bool:
        if any(address in network for network in self.allowed_networks):
            return True
        return address.is_global and not address.is_multicast


def _embedded(address: Address) -> list[Address]:
    """The address and any IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64)."""
    found: list[Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            found.append(address.ipv4_mapped)
        if address.sixtofour:
            found.append(address.sixtofour)
        if address in NAT64:
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def refused_literal(url: str, allowed_networks: Iterable[str] = ()) -> str:
    """The address a URL names by number when the policy refuses it, else "": what can be
    said when the URL is typed. A host name is judged when it is asked (it may change)."""
    try:
        host = httpx.URL(url).host
        address = ipaddress.ip_address(host)
    except (httpx.InvalidURL, TypeError, ValueError):
        return ""
    return "" if DestinationPolicy.allowing(allowed_networks).permits(address) else str(address)


def probe(url: str, timeout: float, *, allowed_networks: Iterable[str] = ()) -> HealthAnswer:
    """GET ``url`` (redirects followed, within the policy); 2xx means the application responds.
    ``timeout`` bounds the whole check. Never raises for what the network or the application
    does: a refusal, a time-out or an error status is the answer."""
    policy = DestinationPolicy.allowing(allowed_networks)
    deadline = _Deadline(timeout)
    shown = mask_url(url)

    def answer(status: int | None = None, error: str = "") -> HealthAnswer:
        return HealthAnswer(shown, status, deadline.elapsed_ms(), error)

    try:
        start = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return answer(error="is not an http(s) URL")
    if start.scheme not in DEFAULT_PORTS or not start.host:
        return answer(error="is not an http(s) URL")
    credentials = ""
    if start.username or start.password:  # sent as a header, and to this origin only
        userinfo = f"{start.username}:{start.password}"  # httpx has decoded them
        credentials = f"Basic {base64.b64encode(userinfo.encode()).decode()}"
    try:
        status = _follow(start, credentials, policy, deadline)
    except _CheckFailed as failure:
        return answer(error=failure.message)
    except httpcore.TimeoutException:
        return answer(error=f"did not answer within {timeout:g} s")
    except httpcore.ProtocolError:
        return answer(error="did not give an HTTP answer")
    except (httpcore.NetworkError, OSError):
        return answer(error="broke the connection")
    except (httpx.HTTPError, httpcore.HTTPCoreError, ValueError):
        return answer(error="could not be asked")
    return answer(status)


def probe_all(
    urls: Sequence[str],
    timeout: float,
    *,
    allowed_networks: Iterable[str] = (),
    max_concurrent: int = MAX_CONCURRENT_PROBES,
) -> list[HealthAnswer]:
    """``probe`` each URL, all at once (up to ``max_concurrent``): N slow endpoints cost one
    ``timeout``, not N. The answers come in the order of ``urls``."""
    if not urls:
        return []
    allowed = tuple(allowed_networks)
    DestinationPolicy.allowing(allowed)  # a bad setting is said here, not once per thread
    workers = max(1, min(max_concurrent, len(urls)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="health-check") as pool:
        return list(pool.map(lambda url: probe(url, timeout, allowed_networks=allowed), urls))


# --- following redirects ---------------------------------------------------------------------
def _follow(
    start: httpx.URL, credentials: str, policy: DestinationPolicy, deadline: _Deadline
) -> int:
    """The status of the last answer, redirects followed by hand so that the credentials
    (an Authorization value, or "") stay with their origin and every hop is inside the
    deadline and the policy."""
    origin = _origin(start)
    # No cookie kept between hops: they would be another credential crossing origins.
    no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
    transport = _GuardedTransport(policy, deadline)
    with httpx.Client(transport=transport, trust_env=False, cookies=no_cookies) as client:
        url = start.copy_with(username=None, password=None)
        for _ in range(MAX_REDIRECTS + 1):
            asked = {"User-Agent": USER_AGENT}
            if credentials and _origin(url) == origin:
                asked["Authorization"] = credentials
            response = client.send(client.build_request("GET", url, headers=asked), stream=True)
            try:
                _read_some(response)
            finally:
                response.close()
            if not response.has_redirect_location:
                return response.status_code
            try:
                url = url.join(response.headers["Location"])
            except httpx.InvalidURL:
                raise _CheckFailed("redirected to an invalid URL") from None
            if url.scheme not in DEFAULT_PORTS or not url.host:
                raise _CheckFailed("redirected to a URL that is not http(s)")
            url = url.copy_with(username=None, password=None, fragment=None)
    raise _CheckFailed(f"redirected more than {MAX_REDIRECTS} times")


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    return url.scheme, url.host, url.port or DEFAULT_PORTS[url.scheme]


def _read_some(response: httpx.Response) -> None:
    received = 0
    for chunk in response.iter_raw():
        received += len(chunk)
        if received >= MAX_BODY_BYTES:
            return


class _CheckFailed(Exception):
    """The check ends here, unanswered, with this short, fixed message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# --- the deadline ----------------------------------------------------------------------------
class _Deadline:
    """``seconds`` from now, for everything one check does."""

    def __init__(self, seconds: float):
        self.started = time.monotonic()
        self.ends = self.started + seconds

    def left(self) -> float:
        """Seconds left; httpcore's time-out once there are none."""
        left = self.ends - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the check's deadline passed")
        return left

    def elapsed_ms(self) -> int:
        return round((time.monotonic() - self.started) * 1000)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write gets only the time the check has left:
    httpx's own time-outs are per operation, so a trickle of bytes would never end them."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: _Deadline):
        self._stream = stream
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, timeout=self._deadline.left())

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout=self._deadline.left())

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        try:
            secured = self._stream.start_tls(
                ssl_context, server_hostname=server_hostname, timeout=self._deadline.left()
            )
        except httpcore.ConnectError as error:
            if isinstance(error.__cause__ or error.__context__, ssl.SSLError):
                raise _CheckFailed("failed the TLS handshake") from None
            raise
        return _DeadlineStream(secured, self._deadline)

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


# --- where a connection may go ---------------------------------------------------------------
class _GuardedBackend(httpcore.NetworkBackend):
    """httpcore's sockets, opened only to addresses the policy allows, within the deadline."""

    def __init__(self, policy: DestinationPolicy, deadline: _Deadline):
        self._policy = policy
        self._deadline = deadline
        self._sockets = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options=None,
    ) -> httpcore.NetworkStream:
        addresses = _resolve(host, port, self._deadline)
        if not addresses or not all(self._policy.permits(each) for each in addresses):
            raise _CheckFailed(REFUSED)  # one refused address refuses the name: no picking
        for address in addresses:  # the checked address itself: no second resolution
            try:
                left = self._deadline.left()
            except httpcore.TimeoutException:
                break
            try:
                stream = self._sockets.connect_tcp(
                    str(address), port, timeout=left, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout, OSError):
                continue
            return _DeadlineStream(stream, self._deadline)
        # Refused, unreachable and silent (filtered) ports all read the same.
        raise _CheckFailed(UNREACHABLE)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise _CheckFailed(REFUSED)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, max(0.0, self._deadline.ends - time.monotonic())))


def _resolve(host: str, port: int, deadline: _Deadline) -> list[Address]:
    """The addresses ``host`` stands for, looked up within the deadline."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    found: dict[str, object] = {}

    def look_up() -> None:
        try:
            found["answer"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            found["answer"] = []

    # getaddrinfo takes no time-out: it runs aside, and is left behind when the time is up.
    lookup = threading.Thread(target=look_up, name="health-check-dns", daemon=True)
    lookup.start()
    with contextlib.suppress(httpcore.TimeoutException):  # no time left: no answer either
        lookup.join(deadline.left())
    if "answer" not in found:
        raise _CheckFailed(UNREACHABLE)
    addresses: list[Address] = []
    for _family, _type, _proto, _name, sockaddr in found["answer"]:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise _CheckFailed(UNRESOLVED)
    return addresses


class _GuardedTransport(httpx.BaseTransport):
    """httpx over an httpcore pool whose connections come from ``_GuardedBackend``."""

    def __init__(self, policy: DestinationPolicy, deadline: _Deadline):
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            network_backend=_GuardedBackend(policy, deadline),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        answered = self._pool.handle_request(sent)
        return httpx.Response(
            status_code=answered.status,
            headers=answered.headers,
            stream=_Body(answered),
            extensions=answered.extensions,
        )

    def close(self) -> None:
        self._pool.close()


class _Body(httpx.SyncByteStream):
    def __init__(self, response: httpcore.Response):
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        yield from self._response.iter_stream()

    def close(self) -> None:
        self._response.close()
