"""GET /api/migrations/health: what the runbook's recovery ends with (curl …/health)."""

import datetime as dt
import time

import pytest
from django.utils import timezone

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import AlertThresholds, Door, WorkerHeartbeat
from migrations_ops.roles import CONSOLE_ADMIN
from tests.factories import TargetFactory, UserFactory, member
from tests.worker import stop

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
    return by_name_of(response.json())


def by_name_of(body: dict) -> dict:
    return {target["name"]: target for target in body["targets"]}


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


# --- the workers ---------------------------------------------------------------------------------
def wait_for_health(reader, status_code: int, seconds: float = 20) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        response = reader.get(HEALTH)
        if response.status_code == status_code or time.monotonic() > deadline:
            assert response.status_code == status_code, response.json()["workers"]
            return response.json()
        time.sleep(0.2)


def test_tasks_run_in_process_need_no_worker(reader, free_target):
    """The embedded default: no worker exists, and none is missed."""
    response = reader.get(HEALTH)

    assert response.status_code == 200
    workers = response.json()["workers"]
    assert (workers["status"], workers["in_process"], workers["alive"]) == ("ok", True, 0)
    assert "no worker is needed" in workers["message"]


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_no_worker_seen_is_critical_until_one_starts_and_again_once_it_stops(
    reader, free_target, own_queue, start_worker
):
    body = wait_for_health(reader, 503)

    assert body["status"] == "critical"
    workers = body["workers"]
    assert (workers["status"], workers["in_process"], workers["queue"]) == (
        "critical",
        False,
        own_queue,
    )
    assert (workers["alive"], workers["last_seen_at"], workers["seen_within_seconds"]) == (
        0,
        None,
        60,
    )
    assert f"no worker of queue '{own_queue}' has ever been seen" in workers["message"]
    assert by_name_of(body)["billing-db"]["status"] == "ok"  # the targets are fine

    process, _ = start_worker()
    body = wait_for_health(reader, 200)

    assert body["status"] == "ok"
    workers = body["workers"]
    assert workers["alive"] == 1
    assert workers["message"] == f"1 worker(s) of queue '{own_queue}' alive"  # no host names
    assert 0 <= workers["last_seen_seconds"] < 5

    stop(process)  # a clean shutdown: it says so as it goes
    body = wait_for_health(reader, 503)

    workers = body["workers"]
    assert workers["alive"] == 0 and workers["last_seen_at"] is not None
    assert "seen within 60 s: the last one stopped" in workers["message"]
    assert f"test-{own_queue}@" not in reader.get(HEALTH).content.decode()


def test_a_worker_silent_for_longer_than_worker_seen_within_is_not_alive(
    reader, free_target, own_queue, settings
):
    settings.WORKER_SEEN_WITHIN = 30
    services.record_worker_alive("w1@host", queues=[own_queue], pid=1)
    services.record_worker_alive("other@host", queues=["another-queue"], pid=2)
    assert reader.get(HEALTH).json()["workers"]["alive"] == 1
    WorkerHeartbeat.objects.filter(hostname="w1@host").update(
        last_seen_at=timezone.now() - dt.timedelta(seconds=31)
    )

    response = reader.get(HEALTH)

    assert response.status_code == 503
    workers = response.json()["workers"]
    assert workers["alive"] == 0  # the other queue's worker does not run our operations
    assert 31 <= workers["last_seen_seconds"] < 40
    assert "seen within 30 s: the last one last seen 3" in workers["message"]
    assert "@host" not in response.content.decode()
