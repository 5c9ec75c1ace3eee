"""GET /api/migrations/health: what the runbook's recovery ends with (curl …/health)."""

import datetime as dt

import pytest

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import AlertThresholds, Door
from migrations_ops.roles import CONSOLE_ADMIN
from tests.factories import TargetFactory, UserFactory, member

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]

HEALTH = "/api/migrations/health"
UNREACHABLE_URL = "postgresql://u:pw@127.0.0.1:1/x"


@pytest.fixture
def reader(client):
    client.force_login(UserFactory(permissions=["migrations_ops.view_target"]))
    return client


@pytest.fixture
def free_target(sqlite_target):
    sqlite_target.create_runbook_books()
    return TargetFactory(name="billing-db", db=sqlite_target)


@pytest.fixture
def locked_target(pg_target):
    """A real PostgreSQL target whose lock was taken 95 s ago (threshold: 30 s), within its
    own 10-minute lock timeout: held too long, not yet stale."""
    pg_target.create_runbook_books(lock_age=dt.timedelta(seconds=95), locked_by="deploy-42")
    return TargetFactory(name="orders-db", db=pg_target, lock_timeout_seconds=600)


def by_name(response) -> dict:
    return {target["name"]: target for target in response.json()["targets"]}


def test_all_ok_is_200(reader, free_target):
    response = reader.get(HEALTH)

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["thresholds"] == {"lock_held_seconds": 30, "failure_rate": 0.1, "retry_rate": 0.5}
    assert by_name(response)["billing-db"]["status"] == "ok"
    assert by_name(response)["billing-db"]["checks"] == []
    assert by_name(response)["billing-db"]["lock"]["state"] == "free"


def test_an_unreadable_target_is_a_warning_and_still_200(reader, free_target):
    TargetFactory(name="legacy-db", connection_url=UNREACHABLE_URL)

    response = reader.get(HEALTH)

    assert response.status_code == 200
    assert response.json()["status"] == "warning"
    (check,) = by_name(response)["legacy-db"]["checks"]
    assert check["check"] == "lock_unknown" and check["status"] == "warning"
    assert check["message"].startswith("lock state unknown")
    assert "pw@" not in response.content.decode()


def test_a_lock_held_over_the_threshold_is_critical_503_naming_the_check(
    reader, free_target, locked_target
):
    response = reader.get(HEALTH)

    assert response.status_code == 503
    assert response["Content-Type"] == "application/json"
    assert response.json()["status"] == "critical"
    orders = by_name(response)["orders-db"]
    assert orders["status"] == "critical"
    (check,) = orders["checks"]
    assert check["check"] == "lock_held"
    assert check["status"] == "critical"
    assert "lock held 9" in check["message"] and "over 30 s" in check["message"]
    assert orders["lock"]["holder"] == "deploy-42"
    assert by_name(response)["billing-db"]["status"] == "ok"


def test_the_thresholds_set_in_the_admin_apply(reader, locked_target):
    AlertThresholds.objects.create(lock_held_seconds=300, failure_rate=0.1, retry_rate=0.5)
    response = reader.get(HEALTH)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_a_token_is_judged_on_its_own_targets_only(client, free_target, locked_target):
    admin = Actor.for_user(member(CONSOLE_ADMIN, "admin1"), Door.ADMIN)
    _, billing_raw = services.create_api_token(actor=admin, name="b", targets=[free_target])
    _, orders_raw = services.create_api_token(actor=admin, name="o", targets=[locked_target])

    billing = client.get(HEALTH, HTTP_AUTHORIZATION=f"Bearer {billing_raw}")
    orders = client.get(HEALTH, HTTP_AUTHORIZATION=f"Bearer {orders_raw}")

    assert billing.status_code == 200
    assert set(by_name(billing)) == {"billing-db"}
    assert orders.status_code == 503
    assert set(by_name(orders)) == {"orders-db"}


def test_health_needs_credentials(client, free_target):
    response = client.get(HEALTH)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
