"""The engine's health probe against a real local HTTP server: no Django, no mocks."""

import subprocess
import sys
from pathlib import Path

import pytest

from migrations_ops.engine import health
from tests.health_server import SLOW_SECONDS, refused_url

TIMEOUT = 0.3


def test_a_2xx_answer_is_healthy(health_server):
    answer = health.probe(f"{health_server}/ok", TIMEOUT)
    assert answer.ok
    assert answer.status == 200
    assert answer.describe() == f"{health_server}/ok answered 200 in {answer.elapsed_ms} ms"


def test_a_redirect_is_followed_to_its_answer(health_server):
    answer = health.probe(f"{health_server}/moved", TIMEOUT)
    assert (answer.ok, answer.status) == (True, 200)


@pytest.mark.parametrize(("path", "status"), [("/down", 503), ("/missing", 404)])
def test_an_error_status_is_an_answer_and_unhealthy(health_server, path, status):
    answer = health.probe(f"{health_server}{path}", TIMEOUT)
    assert not answer.ok
    assert answer.status == status
    assert answer.describe() == f"{health_server}{path} answered {status} in {answer.elapsed_ms} ms"


def test_a_slow_endpoint_fails_at_the_timeout(health_server):
    answer = health.probe(f"{health_server}/slow", TIMEOUT)
    assert not answer.ok
    assert answer.status is None
    assert answer.describe() == f"{health_server}/slow did not answer within 0.3 s"
    assert TIMEOUT * 1000 <= answer.elapsed_ms < SLOW_SECONDS * 1000


def test_a_refused_connection_is_unhealthy():
    url = refused_url()
    answer = health.probe(url, TIMEOUT)
    assert (answer.ok, answer.status) == (False, None)
    assert answer.describe() == f"{url} refused the connection"


def test_credentials_in_the_url_are_sent_and_never_said(health_server):
    private = health_server.replace("http://", "http://probe:s3cret@") + "/private"
    answer = health.probe(private, TIMEOUT)
    assert answer.status == 200
    assert "s3cret" not in answer.describe()
    assert answer.describe().startswith("http://probe:***@127.0.0.1:")
    wrong = private.replace("s3cret", "guess")
    assert health.probe(wrong, TIMEOUT).status == 401


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/health"])
def test_only_http_urls_are_asked(url):
    answer = health.probe(url, TIMEOUT)
    assert not answer.ok
    assert answer.describe().endswith("is not an http(s) URL")


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
