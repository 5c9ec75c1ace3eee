"""``flag_client.http_fetcher`` against real local HTTP servers: the token stays with the
console's origin, and one deadline bounds a request however the bytes come."""

import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from migrations_ops import flag_client
from tests.health_server import FLAGS, FLAGS_TOKEN, TRICKLE_BYTES, TRICKLE_SECONDS, running


@pytest.fixture
def console():
    """Stands in for the console (its flags endpoint); ``seen`` is what reached it."""
    with running() as server:
        yield server


@pytest.fixture
def elsewhere():
    """Another origin: a second server on another port."""
    with running() as server:
        yield server


def fetch(console_url, timeout=2.0, token=FLAGS_TOKEN):
    return flag_client.http_fetcher(console_url, token, "shop", timeout=timeout)("")


def via(server_url: str, other_base: str) -> str:
    """A console URL on ``server_url`` whose flags endpoint redirects to ``other_base``'s."""
    return f"{server_url}/redirect/{urllib.parse.quote(other_base, safe='')}"


def test_the_flags_are_read_with_the_token(console):
    answer = fetch(console.url)
    assert answer.flags == FLAGS
    assert answer.etag == '"v1"'
    assert console.seen[0][1]["Authorization"] == f"Bearer {FLAGS_TOKEN}"


def test_a_redirect_within_the_consoles_origin_keeps_the_token(console):
    answer = fetch(f"{console.url}/same")
    assert answer.flags == FLAGS
    assert [path for path, _ in console.seen] == [
        "/same/api/targets/shop/flags",
        "/api/targets/shop/flags",
    ]


def test_the_token_does_not_follow_a_redirect_to_another_origin(console, elsewhere):
    with pytest.raises(flag_client.FlagsUnavailable) as refused:
        fetch(via(console.url, elsewhere.url))

    port = elsewhere.server_address[1]
    assert str(refused.value) == (
        f"the console at {via(console.url, elsewhere.url)}/api/targets/shop/flags redirected "
        f"to http://127.0.0.1:{port}, another origin: the token is not sent there "
        "(give the console's own URL)"
    )
    assert elsewhere.seen == []  # neither the token nor the request went there


@pytest.mark.parametrize(
    "other",
    [
        "https://127.0.0.1:{port}",  # same host and port, another scheme
        "http://localhost:{port}",  # another host name for the same server
    ],
)
def test_another_scheme_or_host_is_another_origin(console, other):
    port = console.server_address[1]
    with pytest.raises(flag_client.FlagsUnavailable, match="another origin"):
        fetch(via(console.url, other.format(port=port)))
    assert len(console.seen) == 1


# --- one deadline for the whole request --------------------------------------------------------
@pytest.mark.parametrize("trickle", ["/trickle-headers", "/trickle-body"])
def test_a_trickling_answer_is_cut_at_the_deadline(console, trickle):
    # Each byte well within the deadline; all of them far beyond it.
    assert TRICKLE_SECONDS < 1.0 < TRICKLE_SECONDS * TRICKLE_BYTES
    started = time.monotonic()
    with pytest.raises(flag_client.ConsoleUnreachable) as cut:
        fetch(f"{console.url}{trickle}", timeout=1.0)
    took = time.monotonic() - started

    assert str(cut.value) == (
        f"the console did not answer within 1 s at {console.url}{trickle}/api/targets/shop/flags"
    )
    assert 1.0 <= took < 1.5, took


def test_a_cut_request_falls_back_on_the_cached_flags(console, tmp_path):
    url = f"{console.url}/trickle-headers"
    cache = flag_client.FlagCache(tmp_path / "f.json", source=url, target="shop")
    cache.save(FLAGS, etag='"v0"', max_age=0, fetched_at=0)
    started = time.monotonic()

    reading = flag_client.read_flags(
        cache, flag_client.http_fetcher(url, FLAGS_TOKEN, "shop", timeout=0.8)
    )

    assert reading.origin == "cache (console unreachable)"
    assert reading.note.startswith("the console did not answer within 0.8 s at ")
    assert time.monotonic() - started < 1.3


def test_the_client_needs_nothing_but_the_standard_library():
    """Applications copy the file as it is: loaded on its own, it imports only the stdlib."""
    path = Path(flag_client.__file__)
    load = (
        "import importlib.util, sys; before = set(sys.modules); "
        "spec = importlib.util.spec_from_file_location('copied', sys.argv[1]); "
        "module = sys.modules['copied'] = importlib.util.module_from_spec(spec); "
        "spec.loader.exec_module(module); "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} "
        "- set(sys.stdlib_module_names) - {'copied'}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-I", "-c", load, str(path)], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"
