"""opsconsole/cache.py: the console's Redis cache carries on while Redis cannot be reached.

Each test runs a redis-server of its own (tests/redis_server.py): killed, it refuses
connections; frozen, it takes them and never answers (each command waits for the socket
time-out).
"""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.cache import cache

from opsconsole.cache import cache_reconnected
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]

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


def cache_settings(tmp_path, **environment) -> dict:
    """The cache and the broker as opsconsole/settings.py makes them from ``environment``."""
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "CACHE_URL"}}
    env |= {"DJANGO_SETTINGS_MODULE": "opsconsole.settings", "OPSCONSOLE_DATA_DIR": str(tmp_path)}
    script = (
        "import json; from django.conf import settings; "
        "print(json.dumps([settings.CACHES['default'], settings.CELERY_BROKER_URL]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env | environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    cache_config, broker = json.loads(result.stdout)
    return cache_config | {"broker": broker}


def test_the_cache_has_a_url_of_its_own_defaulting_to_the_brokers(tmp_path):
    broker = "redis://127.0.0.1:6379/2"
    shared = cache_settings(tmp_path, REDIS_URL=broker)
    assert shared["BACKEND"] == "opsconsole.cache.DegradingRedisCache"
    assert shared["LOCATION"] == broker
    assert shared["OPTIONS"] == {"socket_connect_timeout": 0.25, "socket_timeout": 0.25}
    assert shared["RETRY_SECONDS"] == 5

    own = cache_settings(tmp_path, REDIS_URL=broker, CACHE_URL="redis://cache.internal:6379/0")
    assert own["LOCATION"] == "redis://cache.internal:6379/0"
    assert own["broker"] == broker
    assert cache_settings(tmp_path)["BACKEND"].endswith("LocMemCache")  # nothing to run
