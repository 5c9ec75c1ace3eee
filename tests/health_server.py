"""A real HTTP server on 127.0.0.1 that answers like an application's health URL."""

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# /slow answers after this long: longer than the time-out the tests give it.
SLOW_SECONDS = 1.5
STATUSES = {"/ok": 200, "/slow": 200, "/down": 503, "/moved": 302}
# /private answers 200 to these credentials only, 401 otherwise.
PRIVATE_AUTHORIZATION = "Basic cHJvYmU6czNjcmV0"  # probe:s3cret


class HealthHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(SLOW_SECONDS)
        status = STATUSES.get(self.path, 404)
        if self.path == "/private":
            status = 200 if self.headers["Authorization"] == PRIVATE_AUTHORIZATION else 401
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "/ok")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):  # keep the test output clean
        pass


@contextlib.contextmanager
def serve() -> Iterator[str]:
    """Its base URL (``http://127.0.0.1:PORT``) while it runs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def refused_url() -> str:
    """A URL on a local port nobody listens on: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/health"
