"""A real HTTP server on 127.0.0.1 that answers like an application's health URL, and like the
console's flags endpoint (for ``flag_client``)."""

import contextlib
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# /slow answers after this long: longer than the time-out the tests give it.
SLOW_SECONDS = 1.5
# /trickle-headers and /trickle-body send one byte every TRICKLE_SECONDS, TRICKLE_BYTES of them:
# each byte comes well within any per-read time-out, the whole takes far longer than a check.
TRICKLE_SECONDS = 0.5
TRICKLE_BYTES = 40
STATUSES = {"/ok": 200, "/slow": 200, "/down": 503, "/moved": 302}
# /private answers 200 to these credentials only, 401 otherwise.
PRIVATE_AUTHORIZATION = "Basic cHJvYmU6czNjcmV0"  # probe:s3cret
# .../api/targets/<name>/flags answers these flags to this token only, 401 otherwise;
# /same/P redirects to P on this server, /redirect/<quoted base URL>/P to P on that server.
FLAGS_TOKEN = "flags-token-0123456789"
FLAGS = {
    "AUTO_MIGRATE": False,
    "MIGRATION_DRY_RUN": True,
    "MIGRATION_MAX_RETRIES": 3,
    "MIGRATION_LOCK_TIMEOUT": 300,
    "MIGRATION_CACHE_TTL": 60,
    "EMERGENCY_BYPASS": False,
}


class HealthHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.seen.append((self.path, dict(self.headers)))
        path, _, query = self.path.partition("?")
        if path in ("/to", "/slowly-to"):  # ?url=U: a redirect to U (another server, or here)
            if path == "/slowly-to":
                time.sleep(SLOW_SECONDS / 2)
            return self.answer(302, Location=urllib.parse.parse_qs(query)["url"][0])
        if path == "/loop":  # a redirect to itself, for ever
            return self.answer(302, Location="/loop")
        if path.startswith("/trickle-"):
            return self.trickle(headers_too=path.startswith("/trickle-headers"))
        if path.startswith("/same/"):
            return self.answer(302, Location=path.removeprefix("/same"))
        if path.startswith("/redirect/"):
            base, _, rest = path.removeprefix("/redirect/").partition("/")
            return self.answer(302, Location=f"{urllib.parse.unquote(base)}/{rest}")
        if path.startswith("/api/targets/") and path.endswith("/flags"):
            return self.flags()
        if path == "/slow":
            time.sleep(SLOW_SECONDS)
        status = STATUSES.get(path, 404)
        if path == "/private":
            status = 200 if self.headers["Authorization"] == PRIVATE_AUTHORIZATION else 401
        return self.answer(status, **({"Location": "/ok"} if status == 302 else {}))

    def answer(self, status, **headers):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def flags(self):
        if self.headers["Authorization"] == f"Bearer {FLAGS_TOKEN}":
            status, body = 200, {"flags": FLAGS}
        else:
            status, body = 401, {"error": {"code": "unauthorized", "message": "a valid token"}}
        content = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("ETag", '"v1"')
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def trickle(self, *, headers_too: bool):
        """A 200 whose headers (or body) come one byte at a time."""
        if headers_too:
            start, dribble = b"HTTP/1.1 200 OK\r\nX-Trickle: ", b"x" * TRICKLE_BYTES
            end = b"\r\nContent-Length: 0\r\n\r\n"
        else:
            start = f"HTTP/1.1 200 OK\r\nContent-Length: {TRICKLE_BYTES}\r\n\r\n".encode()
            dribble, end = b"x" * TRICKLE_BYTES, b""
        self.close_connection = True
        try:
            self.wfile.write(start)
            for byte in dribble:
                time.sleep(TRICKLE_SECONDS)
                self.wfile.write(bytes([byte]))
            self.wfile.write(end)
        except OSError:  # the client gave up: so do we
            pass

    def log_message(self, format, *args):  # keep the test output clean
        pass


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True  # a trickle still running does not hold the shutdown

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HealthHandler)
        self.seen: list[tuple[str, dict[str, str]]] = []  # (path, headers) of every request


@contextlib.contextmanager
def running() -> Iterator[HealthServer]:
    """The server while it runs: ``url`` its base URL, ``seen`` what it was asked."""
    server = HealthServer()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def serve() -> Iterator[str]:
    """Its base URL (``http://127.0.0.1:PORT``) while it runs."""
    with running() as server:
        yield server.url


def redirect_to(server_url: str, url: str, *, slowly: bool = False) -> str:
    """A URL on ``server_url`` that redirects to ``url`` (after SLOW_SECONDS / 2: slowly)."""
    return f"{server_url}/{'slowly-to' if slowly else 'to'}?url={urllib.parse.quote(url, safe='')}"


def refused_url() -> str:
    """A URL on a local port nobody listens on: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/health"
