"""GET /api/migrations/status, as a monitor or an application reads it."""

import datetime as dt
import time

import pytest

from migrations_ops.models import LockObservation
from tests.factories import TargetFactory, UserFactory

pytestmark = pytest.mark.django_db

STATUS = "/api/migrations/status"
STALE = dt.timedelta(minutes=20)
UNREACHABLE_URL = "postgresql://u:SECRETMARKER@127.0.0.1:1/x"


@pytest.fixture
def reader(client):
    client.force_login(UserFactory(permissions=["migrations_ops.view_target"]))
    return client


@pytest.fixture
def two_targets(pg_target, sqlite_target):
    """A PostgreSQL runbook target with a stale lock and a SQLite Knex target, free."""
    pg_target.create_runbook_books(
        applied=("001_create_users.sql", "002_add_email.sql", "003_orders.sql"),
        lock_age=STALE,
        locked_by="deploy-7f3a (pid 4121)",
    )
    sqlite_target.create_knex_books()
    return {
        "orders-staging": TargetFactory(name="orders-staging", db=pg_target),
        "billing-dev": TargetFactory(name="billing-dev", db=sqlite_target, convention="knex"),
    }


def assert_json_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    assert error["code"] and error["message"]
    if code:
        assert error["code"] == code
    return error


def test_anonymous_gets_a_json_401(client):
    assert_json_error(client.get(STATUS), 401, "not_authenticated")


def test_staff_without_view_target_gets_a_json_403(client, two_targets):
    client.force_login(
        UserFactory(username="viewer", permissions=["migrations_ops.view_operation"])
    )
    error = assert_json_error(client.get(STATUS), 403, "forbidden")
    assert "viewer" in error["message"]


def test_non_staff_with_view_target_gets_a_json_403(client):
    client.force_login(UserFactory(is_staff=False, permissions=["migrations_ops.view_target"]))
    assert_json_error(client.get(STATUS), 403, "forbidden")


def test_other_methods_get_a_json_405(reader):
    response = reader.post(STATUS)
    assert response["Allow"] == "GET"
    assert_json_error(response, 405)


def test_status_reports_every_target_lock_and_applied_migrations(reader, two_targets):
    response = reader.get(STATUS)

    assert response.status_code == 200
    targets = response.json()["targets"]
    assert [t["name"] for t in targets] == ["billing-dev", "orders-staging"]
    free, stale = targets

    assert stale["reachable"] is True and stale["error"] is None
    assert stale["dialect"] == "postgresql"
    lock = stale["lock"]
    assert lock["state"] == "stale"
    assert lock["held"] is True
    assert lock["stale"] is True
    assert lock["holder"] == "deploy-7f3a (pid 4121)"
    assert lock["since_source"] == "target"
    since = dt.datetime.fromisoformat(lock["since"])
    assert abs(dt.datetime.now(dt.UTC) - STALE - since) < dt.timedelta(seconds=30)
    assert 1200 <= lock["age_seconds"] < 1230
    assert [m["name"] for m in stale["applied_migrations"]] == [
        "001_create_users.sql",
        "002_add_email.sql",
        "003_orders.sql",
    ]

    assert free["reachable"] is True and free["dialect"] == "sqlite"
    assert free["lock"]["state"] == "free"
    assert free["lock"]["held"] is False
    assert free["lock"]["stale"] is False
    assert free["lock"]["holder"] is None
    assert free["lock"]["since"] is None
    assert free["lock"]["age_seconds"] is None
    assert [m["name"] for m in free["applied_migrations"]] == [
        "20240101000000_init.js",
        "20240201000000_orders.js",
    ]


def test_one_target_by_name(reader, two_targets):
    response = reader.get(STATUS, {"target": "orders-staging"})

    assert response.status_code == 200
    targets = response.json()["targets"]
    assert [t["name"] for t in targets] == ["orders-staging"]
    assert targets[0]["lock"]["state"] == "stale"


def test_unknown_target_is_a_json_404(reader, two_targets):
    error = assert_json_error(reader.get(STATUS, {"target": "nope"}), 404, "unknown_target")
    assert "nope" in error["message"]


def test_an_unreachable_target_is_reported_and_the_others_still_are(reader, two_targets):
    TargetFactory(name="legacy-prod", connection_url=UNREACHABLE_URL)

    response = reader.get(STATUS)

    assert response.status_code == 200
    by_name = {t["name"]: t for t in response.json()["targets"]}
    assert set(by_name) == {"billing-dev", "legacy-prod", "orders-staging"}
    legacy = by_name["legacy-prod"]
    assert legacy["reachable"] is False
    assert legacy["error"].startswith("cannot connect to target")
    assert "\n" not in legacy["error"]
    assert legacy["lock"]["state"] == "unknown"
    assert legacy["applied_migrations"] is None
    assert by_name["orders-staging"]["reachable"] is True
    assert by_name["orders-staging"]["lock"]["state"] == "stale"
    assert by_name["billing-dev"]["lock"]["state"] == "free"
    assert "SECRETMARKER" not in response.content.decode()


def test_the_response_never_holds_the_url_or_its_password(reader, pg_target):
    marker = "PWMARKER93ad"
    url = pg_target.url.replace("postgresql://postgres@", f"postgresql://postgres:{marker}@")
    pg_target.create_runbook_books(lock_age=STALE)
    TargetFactory(name="orders-staging", db=pg_target, connection_url=url)
    TargetFactory(name="legacy-prod", connection_url=UNREACHABLE_URL)

    responses = [reader.get(STATUS, query) for query in ({}, {"target": "legacy-prod"})]

    reports = {t["name"]: t for t in responses[0].json()["targets"]}
    assert reports["orders-staging"]["reachable"] is True  # read through the marked URL
    assert reports["orders-staging"]["lock"]["state"] == "stale"
    assert reports["legacy-prod"]["reachable"] is False
    for response in responses:
        assert response.status_code == 200
        content = response.content.decode()
        for secret in (marker, "SECRETMARKER", url, UNREACHABLE_URL, "postgresql://"):
            assert secret not in content


def test_reading_status_updates_the_lock_observation(reader, two_targets):
    assert not LockObservation.objects.exists()

    before = dt.datetime.now(dt.UTC)
    assert reader.get(STATUS).status_code == 200

    observations = {o.target.name: o for o in LockObservation.objects.select_related("target")}
    assert set(observations) == {"orders-staging", "billing-dev"}
    for observation in observations.values():
        assert observation.observed_at >= before
    assert observations["orders-staging"].held is True
    assert observations["orders-staging"].holder == "deploy-7f3a (pid 4121)"
    assert observations["billing-dev"].held is False


# --- tokens, and readings served from the last few seconds --------------------------------------
@pytest.fixture
def billing_token(roles, two_targets):
    from django.contrib.auth.models import Group

    from migrations_ops import services
    from migrations_ops.actors import Actor
    from migrations_ops.models import Door
    from migrations_ops.roles import CONSOLE_ADMIN

    admin = UserFactory(username="admin1")
    admin.groups.add(Group.objects.get(name=CONSOLE_ADMIN))
    _, raw = services.create_api_token(
        actor=Actor.for_user(admin, Door.ADMIN),
        name="billing",
        targets=[two_targets["billing-dev"]],
    )
    return {"HTTP_AUTHORIZATION": f"Bearer {raw}"}


def test_a_token_sees_only_its_targets(client, billing_token):
    response = client.get(STATUS, **billing_token)

    assert response.status_code == 200
    assert [t["name"] for t in response.json()["targets"]] == ["billing-dev"]
    assert client.get(STATUS, {"target": "billing-dev"}, **billing_token).status_code == 200


def test_a_token_asking_for_a_target_outside_its_scope_is_403(client, billing_token):
    error = assert_json_error(
        client.get(STATUS, {"target": "orders-staging"}, **billing_token), 403, "forbidden"
    )
    assert "orders-staging" in error["message"]
    assert_json_error(
        client.get(STATUS, {"target": "nope"}, **billing_token), 404, "unknown_target"
    )


def test_a_bad_token_is_401(client, two_targets):
    assert_json_error(
        client.get(STATUS, HTTP_AUTHORIZATION="Bearer opc_not-a-token"), 401, "invalid_token"
    )


def test_each_target_says_how_old_its_reading_is_and_live_reads_again(
    reader, two_targets, settings
):
    settings.STATUS_MAX_AGE = 60
    first = reader.get(STATUS).json()
    assert first["max_age_seconds"] == 60
    for target in first["targets"]:
        assert 0 <= target["reading_age_seconds"] < 5
        assert dt.datetime.fromisoformat(target["read_at"]) <= dt.datetime.now(dt.UTC)
    observed = LockObservation.objects.get(target__name="billing-dev").observed_at

    # Within STATUS_MAX_AGE the reading is served again, unchanged, without reading the target.
    cached = reader.get(STATUS).json()
    assert [t["read_at"] for t in cached["targets"]] == [t["read_at"] for t in first["targets"]]
    assert LockObservation.objects.get(target__name="billing-dev").observed_at == observed

    # ?live=1 reads every target now.
    live = reader.get(STATUS, {"live": "1"}).json()
    assert live["max_age_seconds"] == 0
    for before, now in zip(first["targets"], live["targets"], strict=True):
        assert now["read_at"] > before["read_at"]
    assert LockObservation.objects.get(target__name="billing-dev").observed_at > observed


def test_a_reading_older_than_status_max_age_is_read_again(reader, two_targets, settings):
    settings.STATUS_MAX_AGE = 0
    settings.STATUS_READ_AGAIN_IN_BACKGROUND = False
    first = reader.get(STATUS).json()["targets"]
    second = reader.get(STATUS).json()["targets"]
    for before, now in zip(first, second, strict=True):
        assert now["read_at"] > before["read_at"]


@pytest.mark.django_db(transaction=True)
def test_in_the_background_an_old_reading_is_served_with_its_age_then_replaced(
    reader, two_targets, settings
):
    settings.STATUS_MAX_AGE = 0.5
    first = {t["name"]: t for t in reader.get(STATUS).json()["targets"]}
    time.sleep(0.7)

    served = {t["name"]: t for t in reader.get(STATUS).json()["targets"]}
    for name, target in served.items():
        assert target["read_at"] == first[name]["read_at"]
        assert target["reading_age_seconds"] >= 0.7  # said as it is

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        latest = {t["name"]: t for t in reader.get(STATUS).json()["targets"]}
        if all(latest[name]["read_at"] > first[name]["read_at"] for name in first):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the targets were not read again")
    assert latest["orders-staging"]["lock"]["state"] == "stale"
