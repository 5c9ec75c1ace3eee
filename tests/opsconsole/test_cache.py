"""opsconsole/cache.py: the console's Redis cache carries on while Redis cannot be reached.

Each test runs a redis-server of its own (tests/redis_server.py): killed, it refuses
connections; frozen, it takes them and never answers (each command waits for the socket
time-out).
"""

import logging
import time

import pytest
from django.core.cache import cache

from opsconsole.cache import cache_reconnected
from tests.redis_server import free_port

# The console's own receiver of cache_reconnected reads the database.
pytestmark = pytest.mark.django_db

RETRY_SECONDS = 0.3


@pytest.fixture
def redis_cache(own_redis, cache_on_redis):
    cache_on_redis(own_redis.url, retry_seconds=RETRY_SECONDS)
    return own_redis


def outage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "opsconsole.cache"]


def test_while_redis_is_down_the_process_keeps_what_it_writes_and_forgets_it_once_back(
    redis_cache,
):
    cache.set("flag", "from-redis")
    redis_cache.freeze()

    assert cache.get("flag") is None  # a miss, not an error
    assert cache.degraded
    cache.set("flag", "kept-meanwhile")
    assert cache.get("flag") == "kept-meanwhile"
    assert cache.get_many(["flag", "other"]) == {"flag": "kept-meanwhile"}
    assert cache.add("lock", 1, 10) is True
    assert cache.add("lock", 1, 10) is False
    cache.set_many({"a": 1, "b": 2})
    assert cache.incr("a") == 2
    assert cache.delete("b") is True
    cache.delete_many(["a"])
    assert cache.has_key("a") is False
    assert cache.get_or_set("c", 3) == 3

    redis_cache.thaw()
    time.sleep(RETRY_SECONDS + 0.1)

    assert cache.get("flag") == "from-redis"  # Redis again, the process's memory emptied
    assert not cache.degraded
    assert cache.get("lock") is None


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(redis_cache, caplog):
    caplog.set_level(logging.WARNING, logger="opsconsole.cache")
    cache.set("key", 1)
    redis_cache.stop()
    for _ in range(50):
        cache.get("key")
        cache.set("key", 2)
    time.sleep(RETRY_SECONDS + 0.1)
    cache.get("key")  # tries Redis again: still down, and no second line for it

    assert len(outage_lines(caplog)) == 1
    assert "cannot be reached" in outage_lines(caplog)[0]

    redis_cache.start()  # on the same port, empty
    time.sleep(RETRY_SECONDS + 0.1)
    for _ in range(5):
        assert cache.get("key") is None

    assert len(outage_lines(caplog)) == 2
    assert "answers again" in outage_lines(caplog)[1]


def test_a_silent_redis_costs_one_time_out_per_retry_not_one_per_command(redis_cache):
    cache.set("key", 1)
    redis_cache.freeze()
    try:
        started = time.monotonic()
        cache.get("key")  # waits for the socket time-out, once
        first = time.monotonic() - started
        started = time.monotonic()
        for _ in range(200):
            cache.get("key")
        rest = time.monotonic() - started
    finally:
        redis_cache.thaw()

    assert 0.2 <= first < 1.0  # CACHE_SOCKET_TIMEOUT, 0.25 s
    assert rest < 0.25 * 3  # at most a try or two, every RETRY_SECONDS


def test_redis_back_is_announced_before_the_command_is_answered(redis_cache):
    """Receivers of ``cache_reconnected`` drop what went stale in Redis during the outage: the
    command that found Redis back must already see what they did."""
    calls = []

    def drop_stale(sender, outage_seconds, **kwargs):
        calls.append(outage_seconds)
        cache.delete("stale")

    cache.set("stale", "from before the outage")
    redis_cache.freeze()
    cache.get("stale")
    cache_reconnected.connect(drop_stale)
    try:
        redis_cache.thaw()
        time.sleep(RETRY_SECONDS + 0.1)
        assert cache.get("stale") is None
        assert cache.get("stale") is None
    finally:
        cache_reconnected.disconnect(drop_stale)

    assert len(calls) == 1 and calls[0] > 0


def test_a_redis_never_up_is_a_miss_and_its_password_is_not_logged(cache_on_redis, caplog):
    caplog.set_level(logging.WARNING, logger="opsconsole.cache")
    cache_on_redis(f"redis://:SECRETMARKER@127.0.0.1:{free_port()}/0")

    assert cache.get("key") is None
    cache.set("key", 1)
    assert cache.get("key") == 1

    assert len(outage_lines(caplog)) == 1
    assert "SECRETMARKER" not in caplog.text
    assert "127.0.0.1" in outage_lines(caplog)[0]
