"""The engine's health probe against real local HTTP servers: no Django, no mocks.

The servers listen on loopback, which the destination policy refuses unless allowed: tests
that talk to them allow 127.0.0.0/8 (LOOPBACK), and the policy's own tests leave it out.
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migrations_ops.engine import health
from tests.health_server import (
    PRIVATE_AUTHORIZATION,
    SLOW_SECONDS,
    TRICKLE_BYTES,
    TRICKLE_SECONDS,
    redirect_to,
    refused_url,
    running,
)

TIMEOUT = 0.3
LOOPBACK = ["127.0.0.0/8"]


def probe(url, timeout=TIMEOUT, allowed_networks=LOOPBACK):
    return health.probe(url, timeout, allowed_networks=allowed_networks)


@pytest.fixture
def other_server():
    """A second server, on another port: another origin. Its ``seen`` holds what reached it."""
    with running() as server:
        yield server


def test_a_2xx_answer_is_healthy(health_server):
    answer = probe(f"{health_server}/ok")
    assert answer.ok
    assert answer.status == 200
    assert answer.describe() == f"{health_server}/ok answered 200 in {answer.elapsed_ms} ms"


def test_a_redirect_is_followed_to_its_answer(health_server):
    answer = probe(f"{health_server}/moved")
    assert (answer.ok, answer.status) == (True, 200)


@pytest.mark.parametrize(("path", "status"), [("/down", 503), ("/missing", 404)])
def test_an_error_status_is_an_answer_and_unhealthy(health_server, path, status):
    answer = probe(f"{health_server}{path}")
    assert not answer.ok
    assert answer.status == status
    assert answer.describe() == f"{health_server}{path} answered {status} in {answer.elapsed_ms} ms"


def test_a_slow_endpoint_fails_at_the_timeout(health_server):
    answer = probe(f"{health_server}/slow")
    assert not answer.ok
    assert answer.status is None
    assert answer.describe() == f"{health_server}/slow did not answer within 0.3 s"
    assert TIMEOUT * 1000 <= answer.elapsed_ms < SLOW_SECONDS * 1000


def test_a_refused_connection_is_unhealthy():
    url = refused_url()
    answer = probe(url)
    assert (answer.ok, answer.status) == (False, None)
    assert answer.describe() == f"{url} could not be reached"


def test_credentials_in_the_url_are_sent_and_never_said(health_server):
    private = health_server.replace("http://", "http://probe:s3cret@") + "/private"
    answer = probe(private)
    assert answer.status == 200
    assert "s3cret" not in answer.describe()
    assert answer.describe().startswith("http://probe:***@127.0.0.1:")
    wrong = private.replace("s3cret", "guess")
    assert probe(wrong).status == 401


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/health", "http://"])
def test_only_http_urls_are_asked(url):
    answer = probe(url)
    assert not answer.ok
    assert answer.describe().endswith("is not an http(s) URL")


def test_a_failed_tls_handshake_is_said(health_server):
    answer = probe(health_server.replace("http://", "https://") + "/ok")
    assert answer.error == "failed the TLS handshake"


# --- credentials stay with their origin ------------------------------------------------------
def test_credentials_do_not_follow_a_redirect_to_another_origin(other_server):
    with running() as first:
        start = redirect_to(first.url, f"{other_server.url}/private")
        answer = probe(start.replace("http://", "http://probe:s3cret@"))

    assert answer.status == 401  # the other server was asked, without the credentials
    assert first.seen[0][1]["Authorization"] == PRIVATE_AUTHORIZATION
    assert [path for path, _ in other_server.seen] == ["/private"]
    assert "Authorization" not in other_server.seen[0][1]


def test_credentials_follow_a_redirect_within_their_origin(health_server):
    start = redirect_to(health_server, "/private")
    answer = probe(start.replace("http://", "http://probe:s3cret@"))
    assert answer.status == 200


def test_credentials_go_back_to_their_origin_only(other_server):
    with running() as first:
        back = redirect_to(other_server.url, f"{first.url}/private")
        answer = probe(redirect_to(first.url, back).replace("http://", "http://probe:s3cret@"))
    assert "Authorization" not in other_server.seen[0][1]
    assert answer.status == 200  # the last hop is the URL's own origin again


def test_a_redirect_loop_ends(health_server):
    answer = probe(f"{health_server}/loop")
    assert answer.describe() == f"{health_server}/loop redirected more than 5 times"


def test_a_redirect_to_a_non_http_url_is_not_followed(health_server):
    answer = probe(redirect_to(health_server, "file:///etc/passwd"))
    assert answer.describe().endswith(" redirected to a URL that is not http(s)")


# --- one deadline for the whole check --------------------------------------------------------
@pytest.mark.parametrize("path", ["/trickle-headers", "/trickle-body"])
def test_a_trickling_endpoint_is_cut_at_the_deadline(health_server, path):
    # Each byte comes well within the deadline; all of them would take far longer.
    assert TRICKLE_SECONDS < 1.2 < TRICKLE_SECONDS * TRICKLE_BYTES
    started = time.monotonic()
    answer = probe(f"{health_server}{path}", timeout=1.2)
    took = time.monotonic() - started

    assert answer.describe() == f"{health_server}{path} did not answer within 1.2 s"
    assert 1.2 <= took < 1.6


def test_redirects_share_the_deadline(health_server):
    # Three hops of SLOW_SECONDS / 2 each: every one within the deadline, all three not.
    deadline = SLOW_SECONDS * 0.8
    hops = f"{health_server}/ok"
    for _ in range(3):
        hops = redirect_to(health_server, hops, slowly=True)
    started = time.monotonic()
    answer = probe(hops, timeout=deadline)
    assert answer.error == f"did not answer within {deadline:g} s"
    assert deadline <= time.monotonic() - started < deadline + 0.4


def test_several_slow_endpoints_cost_one_deadline(health_server):
    urls = [f"{health_server}/trickle-headers"] * 5 + [f"{health_server}/ok"]
    started = time.monotonic()
    answers = health.probe_all(urls, 1.0, allowed_networks=LOOPBACK)
    took = time.monotonic() - started

    assert [answer.ok for answer in answers] == [False] * 5 + [True]
    assert 1.0 <= took < 1.8, took


# --- where a check may go --------------------------------------------------------------------
@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",  # loopback
        "127.8.9.10",
        "[::1]",
        "localhost",  # checked after resolution, not by its name
        "169.254.169.254",  # link-local: the cloud metadata service
        "[fe80::1]",
        "10.1.2.3",  # private
        "172.16.0.1",
        "192.168.1.1",
        "[fd00::1]",  # unique local
        "100.64.0.1",  # shared (carrier-grade NAT)
        "224.0.0.1",  # multicast
        "[ff02::1]",
        "0.0.0.0",  # unspecified  # noqa: S104
        "[::]",
        "240.0.0.1",  # reserved
        "[::ffff:127.0.0.1]",  # IPv4 inside IPv6
        "[64:ff9b::a9fe:a9fe]",  # 169.254.169.254 through NAT64
        "[2002:7f00:1::]",  # 127.0.0.1 through 6to4
    ],
)
def test_private_destinations_are_refused(host):
    started = time.monotonic()
    answer = health.probe(f"http://{host}:6379/health", 2)
    assert answer.describe() == f"http://{host}:6379/health refused by the destination policy"
    assert time.monotonic() - started < 1  # refused before any connection is tried


def test_an_open_and_a_closed_port_are_refused_alike(health_server):
    opened, closed = f"{health_server}/ok", refused_url()
    answers = [health.probe(url, TIMEOUT) for url in (opened, closed)]
    assert [answer.error for answer in answers] == ["refused by the destination policy"] * 2
    assert [answer.status for answer in answers] == [None, None]


@pytest.mark.parametrize("elsewhere", ["169.254.169.254", "10.0.0.1", "[::1]"])
def test_a_redirect_to_a_refused_destination_is_not_followed(health_server, elsewhere):
    # The first hop is allowed (loopback IPv4 allowed); where it sends the check is not.
    started = time.monotonic()
    answer = probe(redirect_to(health_server, f"http://{elsewhere}/latest/meta-data"), 2)
    assert answer.error == "refused by the destination policy"
    assert time.monotonic() - started < 1


def test_the_allowed_networks_let_a_destination_through(health_server):
    assert health.probe(f"{health_server}/ok", TIMEOUT).error == health.REFUSED
    assert probe(f"{health_server}/ok", allowed_networks=["127.0.0.1/32"]).ok
    assert not probe(f"{health_server}/ok", allowed_networks=["10.0.0.0/8"]).ok


def test_public_addresses_pass_the_policy():
    policy = health.DestinationPolicy()
    public = ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "1.1.1.1"]
    assert all(policy.permits(health.ipaddress.ip_address(address)) for address in public)


def test_a_name_is_resolved_once_and_the_checked_address_is_connected(monkeypatch):
    """A name that answers loopback (allowed here) when checked and the metadata service
    afterwards gains nothing: the connection goes to the address that was checked."""
    real = socket.getaddrinfo
    asked = []

    def rebinding(host, port, *args, **kwargs):
        if host != "app.example":
            return real(host, port, *args, **kwargs)
        asked.append(host)
        address = "127.0.0.1" if len(asked) == 1 else "169.254.169.254"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with running() as server:
        port = server.server_address[1]
        answer = probe(f"http://app.example:{port}/ok", timeout=2)
    assert answer.status == 200, answer
    assert server.seen[0][1]["Host"] == f"app.example:{port}"
    assert asked == ["app.example"]


def test_the_probe_needs_no_django():
    imports = (
        "import sys, migrations_ops.engine.health; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'django'))"
    )
    found = subprocess.run(
        [sys.executable, "-c", imports],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "[]"
