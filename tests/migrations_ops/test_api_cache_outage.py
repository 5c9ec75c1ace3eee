"""The read endpoints while the cache's Redis is down: status, flags, health and metrics answer
from the process and the console's database (the applications read their kill switches exactly
when infrastructure is failing), tokens are checked against the database, and nothing changed
during the outage is served stale once Redis is back.

Each test runs a redis-server of its own (tests/redis_server.py) and kills or freezes it.
"""

import time

import pytest

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import Door
from migrations_ops.roles import CONSOLE_ADMIN, ON_CALL
from tests.factories import TargetFactory, member
from tests.redis_server import free_port

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]

STATUS = "/api/migrations/status"
FLAGS = "/api/targets/orders-db/flags"
HEALTH = "/api/migrations/health"
METRICS = "/metrics"
READS = (STATUS, FLAGS, HEALTH, METRICS)


@pytest.fixture
def orders(sqlite_target):
    sqlite_target.create_runbook_books()
    return TargetFactory(name="orders-db", db=sqlite_target)


@pytest.fixture
def admin():
    return Actor.for_user(member(CONSOLE_ADMIN, "admin1"), Door.ADMIN)


def new_token(admin, orders, name="orders-app"):
    token, raw = services.create_api_token(actor=admin, name=name, targets=[orders])
    return token, {"HTTP_AUTHORIZATION": f"Bearer {raw}"}


def bypass(orders, value: bool) -> None:
    services.change_flags(
        actor=Actor.for_user(member(ON_CALL, f"oncall-{value}"), Door.CLI),
        target=orders,
        changes={"EMERGENCY_BYPASS": value},
        reason="skip migrations while the cache is down",
    )


def bypass_served(client, token) -> bool:
    response = client.get(FLAGS, **token)
    assert response.status_code == 200, response.content
    return response.json()["flags"]["EMERGENCY_BYPASS"]


def assert_every_read_answers(client, token) -> None:
    for url in READS:
        response = client.get(url, **token)
        assert response.status_code == 200, (url, response.status_code, response.content)
    status = client.get(STATUS, **token).json()["targets"]
    assert [t["name"] for t in status] == ["orders-db"]
    assert status[0]["reading_age_seconds"] >= 0  # where the reading comes from, its age
    health = client.get(HEALTH, **token).json()
    assert health["status"] == "ok"
    assert isinstance(health["targets"][0]["reading_age_seconds"], float)
    assert 'opsconsole_flag{flag="AUTO_MIGRATE",target="orders-db"} 1.0' in (
        client.get(METRICS, **token).content.decode()
    )


def test_every_read_answers_while_redis_is_down_and_a_flag_changed_meanwhile_is_seen(
    client, own_redis, cache_on_redis, orders, admin
):
    cache_on_redis(own_redis.url)
    _, token = new_token(admin, orders)
    assert_every_read_answers(client, token)  # everything now cached in Redis
    assert bypass_served(client, token) is False

    own_redis.stop()

    assert_every_read_answers(client, token)
    bypass(orders, True)  # in the database, as another process would
    assert bypass_served(client, token) is True
    bypass(orders, False)
    assert bypass_served(client, token) is False


def test_every_read_answers_when_redis_was_never_up(client, cache_on_redis, orders, admin):
    cache_on_redis(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    _, token = new_token(admin, orders)

    assert_every_read_answers(client, token)
    bypass(orders, True)
    assert bypass_served(client, token) is True


def test_a_token_revoked_while_redis_is_down_is_refused_and_stays_refused_once_it_is_back(
    client, own_redis, cache_on_redis, orders, admin
):
    """Frozen, Redis keeps its data: the token it remembers as active, the flags it holds.
    Neither may be served once it answers again, though the revoke and the change made during
    the outage never reached it."""
    cache_on_redis(own_redis.url)
    revoked, token = new_token(admin, orders)
    _, other = new_token(admin, orders, name="other-app")
    assert bypass_served(client, token) is False
    assert bypass_served(client, other) is False  # both tokens and the flags now in Redis

    own_redis.freeze()

    assert bypass_served(client, token) is False
    services.revoke_api_token(actor=admin, token=revoked)
    assert client.get(FLAGS, **token).status_code == 401
    bypass(orders, True)
    assert bypass_served(client, other) is True

    own_redis.thaw()
    time.sleep(0.5)  # past CACHE_RETRY_SECONDS: the next request asks Redis again
    for _ in range(3):  # the first finds Redis back, the next are served from it
        assert bypass_served(client, other) is True
        response = client.get(FLAGS, **token)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_token"
    from django.core.cache import cache

    assert not cache.degraded  # served from Redis again


def test_a_dead_redis_costs_no_time_out_per_request(
    client, own_redis, cache_on_redis, orders, admin
):
    """Frozen, Redis takes connections but never answers: each command waits for the socket
    time-out (0.25 s). Only the first request after the failure and one every
    CACHE_RETRY_SECONDS may wait for it."""
    cache_on_redis(own_redis.url, retry_seconds=5)
    _, token = new_token(admin, orders)
    assert bypass_served(client, token) is False
    own_redis.freeze()
    try:
        client.get(FLAGS, **token)  # finds Redis silent
        started = time.monotonic()
        for _ in range(20):
            assert bypass_served(client, token) is False
        assert time.monotonic() - started < 20 * 0.25 / 2
    finally:
        own_redis.thaw()
