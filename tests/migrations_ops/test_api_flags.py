"""GET /api/targets/<name>/flags: what an application's auto-migrator reads at start-up."""

import uuid

import pytest

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import Door
from migrations_ops.roles import CONSOLE_ADMIN, ON_CALL
from tests.factories import TargetFactory, UserFactory, member

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]

FLAGS = "/api/targets/{}/flags"


@pytest.fixture
def orders():
    return TargetFactory(name="orders-db", max_retries=3, cache_ttl_seconds=120)


@pytest.fixture
def billing():
    return TargetFactory(name="billing-db")


@pytest.fixture
def orders_token(orders):
    admin = Actor.for_user(member(CONSOLE_ADMIN, "admin1"), Door.ADMIN)
    _, raw = services.create_api_token(actor=admin, name="orders-app", targets=[orders])
    return {"HTTP_AUTHORIZATION": f"Bearer {raw}"}


def assert_json_error(response, status, code):
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]


def test_the_flags_with_their_etag_and_max_age(client, orders, orders_token):
    response = client.get(FLAGS.format("orders-db"), **orders_token)

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "target": "orders-db",
        "flags": {
            "AUTO_MIGRATE": True,
            "MIGRATION_DRY_RUN": False,
            "MIGRATION_MAX_RETRIES": 3,
            "MIGRATION_LOCK_TIMEOUT": 60,
            "MIGRATION_CACHE_TTL": 120,
            "EMERGENCY_BYPASS": False,
        },
        "stage": "normal",
        "changed_at": None,
        "change_reason": None,
    }
    assert response["Cache-Control"] == "private, max-age=120"
    etag = response["ETag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 20

    again = client.get(FLAGS.format("orders-db"), **orders_token)
    assert again["ETag"] == etag and again.content == response.content


def test_a_conditional_request_with_the_current_etag_answers_304_without_body(
    client, orders, orders_token
):
    etag = client.get(FLAGS.format("orders-db"), **orders_token)["ETag"]

    response = client.get(FLAGS.format("orders-db"), HTTP_IF_NONE_MATCH=etag, **orders_token)

    assert response.status_code == 304
    assert response.content == b""
    assert response["ETag"] == etag
    assert response["Cache-Control"] == "private, max-age=120"
    other = client.get(FLAGS.format("orders-db"), HTTP_IF_NONE_MATCH='"old"', **orders_token)
    assert other.status_code == 200


def test_a_flag_change_is_visible_at_once_with_a_new_etag(client, orders, orders_token):
    first = client.get(FLAGS.format("orders-db"), **orders_token)
    on_call = Actor.for_user(member(ON_CALL, "oncall"), Door.ADMIN)

    services.emergency_disable(actor=on_call, targets=[orders], reason="lock loop in prod")

    response = client.get(
        FLAGS.format("orders-db"), HTTP_IF_NONE_MATCH=first["ETag"], **orders_token
    )
    assert response.status_code == 200
    assert response["ETag"] != first["ETag"]
    body = response.json()
    assert body["flags"]["AUTO_MIGRATE"] is False
    assert body["flags"]["MIGRATION_MAX_RETRIES"] == 0
    assert body["stage"] == "disabled"
    assert body["change_reason"] == "lock loop in prod"
    assert body["changed_at"] is not None

    services.change_flags(
        actor=on_call, target=orders, changes={"MIGRATION_CACHE_TTL": 30}, reason="poll faster"
    )
    response = client.get(FLAGS.format("orders-db"), **orders_token)
    assert response.json()["flags"]["MIGRATION_CACHE_TTL"] == 30
    assert response["Cache-Control"] == "private, max-age=30"


def test_a_staff_session_with_view_target_reads_any_target(client, orders, billing):
    client.force_login(UserFactory(permissions=["migrations_ops.view_target"]))
    assert client.get(FLAGS.format("billing-db")).json()["target"] == "billing-db"


def test_no_credentials_or_a_bad_token_is_401(client, orders):
    assert_json_error(client.get(FLAGS.format("orders-db")), 401, "not_authenticated")
    assert_json_error(
        client.get(FLAGS.format("orders-db"), HTTP_AUTHORIZATION="Bearer opc_wrong"),
        401,
        "invalid_token",
    )
    assert_json_error(
        client.get(FLAGS.format("orders-db"), HTTP_AUTHORIZATION="Basic abc"),
        401,
        "not_authenticated",
    )


def test_a_token_without_that_target_in_scope_is_403(client, orders, billing, orders_token):
    response = client.get(FLAGS.format("billing-db"), **orders_token)
    assert_json_error(response, 403, "forbidden")
    assert "billing-db" in response.json()["error"]["message"]
    assert "AUTO_MIGRATE" not in response.content.decode()


def test_an_unknown_target_is_404(client, orders, orders_token):
    response = client.get(FLAGS.format("nope"), **orders_token)
    assert_json_error(response, 404, "unknown_target")
    assert "nope" in response.json()["error"]["message"]


def test_only_get_is_allowed(client, orders, orders_token):
    response = client.post(FLAGS.format("orders-db"), **orders_token)
    assert_json_error(response, 405, "method_not_allowed")
    assert response["Allow"] == "GET"


def test_the_shared_cache_serves_a_change_made_by_another_process_at_once(
    client, orders, orders_token, settings
):
    """With Redis (REDIS_URL) the flags are served from the cache, versioned by every change of
    a target: the change below is made in this process, as another would, and read back."""
    prefix = f"test-flags-{uuid.uuid4().hex}"
    settings.CACHES = {
        "default": {
            "BACKEND": "opsconsole.cache.KeptClientRedisCache",
            "LOCATION": settings.REDIS_URL,
            "KEY_PREFIX": prefix,
        }
    }
    from django.core.cache import cache

    try:
        assert (
            client.get(FLAGS.format("orders-db"), **orders_token).json()["flags"][
                "EMERGENCY_BYPASS"
            ]
            is False
        )
        services.change_flags(
            actor=Actor.for_user(member(ON_CALL, "oncall"), Door.CLI),
            target=orders,
            changes={"EMERGENCY_BYPASS": True},
            reason="skip migrations on this deploy",
        )
        response = client.get(FLAGS.format("orders-db"), **orders_token)
        assert response.json()["flags"]["EMERGENCY_BYPASS"] is True
    finally:  # this test's keys only: the Redis database is shared with other test runs
        redis = cache._cache.get_client()
        for key in redis.scan_iter(match=f"{prefix}:*"):
            redis.delete(key)
