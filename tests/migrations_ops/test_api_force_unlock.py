"""POST /api/targets/<name>/force-unlock and GET /api/operations/<id>."""

import datetime as dt
import json

import pytest

from migrations_ops.models import Environment, Operation
from tests.factories import ON_CALL_PERMISSIONS, IncidentFactory, TargetFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def engineer_client(client):
    client.force_login(UserFactory(permissions=ON_CALL_PERMISSIONS))
    return client


def post(client, name, body, **extra):
    return client.post(
        f"/api/targets/{name}/force-unlock",
        data=body if isinstance(body, str) else json.dumps(body),
        content_type="application/json",
        **extra,
    )


def test_force_unlock_over_the_api(engineer_client, pg_target, django_capture_on_commit_callbacks):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20), locked_by="deploy-3")
    TargetFactory(db=pg_target, name="orders")
    with django_capture_on_commit_callbacks(execute=True):
        response = post(engineer_client, "orders", {"reason": "crashed deploy"})
    assert response.status_code == 202
    operation = response.json()["operation"]
    assert operation["status"] == "queued"
    assert operation["door"] == "api"
    assert pg_target.runbook_lock_rows() == []

    detail = engineer_client.get(response.json()["url"]).json()["operation"]
    assert detail["status"] == "succeeded"
    assert detail["result"]["before"]["holder"] == "deploy-3"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ("not json", 400, "invalid_json"),
        ("[1, 2]", 400, "invalid_json"),
        ({"reason": ""}, 400, "invalid_request"),
        ({}, 400, "invalid_request"),
    ],
)
def test_bad_bodies_are_refused_and_change_nothing(engineer_client, pg_target, body, status, code):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20))
    TargetFactory(db=pg_target, name="orders")
    response = post(engineer_client, "orders", body)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert Operation.objects.count() == 0
    assert len(pg_target.runbook_lock_rows()) == 1


def test_refusals_map_to_http_statuses(client, engineer_client, pg_target, sqlite_target):
    pg_target.create_runbook_books(lock_age=dt.timedelta(seconds=2))
    TargetFactory(db=pg_target, name="fresh")
    sqlite_target.create_runbook_books()
    TargetFactory(db=sqlite_target, name="free")
    TargetFactory(name="prod", environment=Environment.PRODUCTION)
    TargetFactory(name="gone", connection_url="postgresql://u:pw-marker@127.0.0.1:1/x")

    def error(name, body=None):
        response = post(engineer_client, name, body or {"reason": "x"})
        return response.status_code, response.json()["error"]

    assert error("nope") == (404, {"code": "unknown_target", "message": "unknown target 'nope'"})
    status, body = error("fresh")
    assert (status, body["code"]) == (409, "conflict") and "not stale" in body["message"]
    status, body = error("free")
    assert (status, body["code"]) == (409, "conflict") and "not held" in body["message"]
    status, body = error("prod", {"reason": "x", "confirm_name": "wrong"})
    assert (status, body["code"]) == (400, "invalid_request")
    status, body = error("gone")
    assert (status, body["code"]) == (503, "target_unavailable")
    assert "pw-marker" not in body["message"]
    assert Operation.objects.count() == 0


def test_permission_and_method_are_checked(client, pg_target):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20))
    TargetFactory(db=pg_target, name="orders")
    assert post(client, "orders", {"reason": "x"}).status_code == 401
    client.force_login(UserFactory(permissions=["migrations_ops.view_target"]))
    response = post(client, "orders", {"reason": "x"})
    assert response.status_code == 403
    assert "not allowed to force-release" in response.json()["error"]["message"]
    response = client.get("/api/targets/orders/force-unlock")
    assert response.status_code == 405 and response["Allow"] == "POST"
    assert len(pg_target.runbook_lock_rows()) == 1


def test_session_posts_need_a_csrf_token(pg_target):
    from django.test import Client

    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20))
    TargetFactory(db=pg_target, name="orders")
    client = Client(enforce_csrf_checks=True)
    client.force_login(UserFactory(permissions=ON_CALL_PERMISSIONS))
    response = post(client, "orders", {"reason": "x"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "csrf_failed"
    assert len(pg_target.runbook_lock_rows()) == 1


def test_unknown_operation_is_a_json_404(engineer_client):
    response = engineer_client.get("/api/operations/999999")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_operation"


def test_approve_and_reject_over_the_api(client, pg_target, django_capture_on_commit_callbacks):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20))
    TargetFactory(db=pg_target, name="prod", environment=Environment.PRODUCTION)
    requester = UserFactory(permissions=ON_CALL_PERMISSIONS)
    approver = UserFactory(permissions=[*ON_CALL_PERMISSIONS, "migrations_ops.approve_operation"])
    client.force_login(requester)
    created = post(client, "prod", {"reason": "stuck", "confirm_name": "prod"}).json()
    assert created["operation"]["status"] == "awaiting_approval"
    approve_url = f"{created['url']}/approve"

    response = client.post(approve_url, data="{}", content_type="application/json")
    assert response.status_code == 403  # the requester may not even hold the permission

    client.force_login(approver)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(approve_url, data="{}", content_type="application/json")
    assert response.status_code == 200
    assert pg_target.runbook_lock_rows() == []
    again = client.post(
        f"{created['url']}/reject", data='{"reason": "late"}', content_type="application/json"
    )
    assert again.status_code == 409
    assert "not awaiting approval" in again.json()["error"]["message"]
    missing = client.post(
        "/api/operations/999999/approve", data="{}", content_type="application/json"
    )
    assert missing.status_code == 404


def test_the_release_serves_the_incident_it_names(
    engineer_client, pg_target, django_capture_on_commit_callbacks
):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20))
    TargetFactory(db=pg_target, name="orders")
    incident = IncidentFactory(status="monitoring")

    with django_capture_on_commit_callbacks(execute=True):
        response = post(engineer_client, "orders", {"reason": "stuck", "incident": incident.pk})

    assert response.status_code == 202
    assert response.json()["operation"]["incident"] == incident.pk
    assert Operation.objects.get().incident == incident
    assert engineer_client.get(response.json()["url"]).json()["operation"]["incident"] == (
        incident.pk
    )


@pytest.mark.parametrize(
    ("incident", "status", "code", "message"),
    [
        (
            "closed",
            400,
            "invalid_request",
            "incident #{pk} is closed: operations can no longer be linked to it",
        ),
        (999999, 404, "unknown_incident", "no incident #999999"),
        ("12", 400, "invalid_request", "incident must be an incident number, such as 12"),
        (True, 400, "invalid_request", "incident must be an incident number, such as 12"),
    ],
)
def test_a_closed_unknown_or_malformed_incident_is_refused(
    engineer_client, pg_target, incident, status, code, message
):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20))
    TargetFactory(db=pg_target, name="orders")
    closed = IncidentFactory(status="closed")
    if incident == "closed":
        incident = closed.pk

    response = post(engineer_client, "orders", {"reason": "stuck", "incident": incident})

    assert response.status_code == status
    assert response.json()["error"] == {"code": code, "message": message.format(pk=closed.pk)}
    assert Operation.objects.count() == 0
    assert len(pg_target.runbook_lock_rows()) == 1
