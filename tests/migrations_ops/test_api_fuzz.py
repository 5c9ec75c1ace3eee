"""The API fuzzed from its own OpenAPI document (schemathesis): every operation, with a real API
token and a real staff session, answers no 500 and only what the document describes; and the
hostile requests once seen to fail are replayed as explicit cases."""

from __future__ import annotations

import datetime as dt
import zlib
from dataclasses import dataclass

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.test import Client
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from migrations_ops import openapi, services
from migrations_ops.actors import Actor
from migrations_ops.models import Door
from migrations_ops.roles import CONSOLE_ADMIN, ON_CALL
from tests.factories import ON_CALL_PERMISSIONS, TargetFactory, UserFactory, member

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]

schema = schemathesis.openapi.from_dict(openapi.document())
schema.app = get_wsgi_application()

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
CSRF = "fuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzz"  # any 32 letters: the cookie and the header agree


@pytest.fixture(autouse=True)
def connection_kept_across_requests():
    """Django's WSGI handler closes the database connection when a request ends; the test's
    transaction lives on that connection (Django's test client disconnects the same signal)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@dataclass
class Console:
    readable: str  # the target the token may read
    locked: str  # a target with a stale lock, under the two-person rule, not the token's
    operation_id: int  # an operation on it awaiting the approval of the session's user
    credentials: dict  # call_and_validate's headers and cookies


@pytest.fixture
def console(pg_target, sqlite_target):
    """Both ways in: an application's token (read endpoints) and the session of an on-call
    engineer who may approve, with its CSRF token (the operations). The token does not see the
    locked target: health answers 503 when critical, which not_a_server_error would count."""
    sqlite_target.create_runbook_books()
    orders = TargetFactory(db=sqlite_target, name="orders")
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=30), locked_by="deploy-1")
    billing = TargetFactory(db=pg_target, name="billing", requires_approval=True)
    admin = Actor.for_user(member(CONSOLE_ADMIN, "fuzz-admin"), Door.ADMIN)
    _, raw = services.create_api_token(actor=admin, name="fuzz", targets=[orders])
    requester = Actor.for_user(member(ON_CALL, "fuzz-requester"), Door.ADMIN)
    awaiting = services.request_force_unlock(actor=requester, target=billing, reason="stuck")
    client = Client()
    client.force_login(
        UserFactory(
            username="fuzz-approver",
            permissions=[*ON_CALL_PERMISSIONS, "migrations_ops.approve_operation"],
        )
    )
    return Console(
        readable=orders.name,
        locked=billing.name,
        operation_id=awaiting.pk,
        credentials={
            "headers": {"Authorization": f"Bearer {raw}", "X-CSRFToken": CSRF},
            "cookies": {"sessionid": client.cookies["sessionid"].value, "csrftoken": CSRF},
        },
    )


def aim(case, console: Console) -> None:
    """Every other case (decided by its own content, so a failure replays alike) is pointed at
    the console's real targets and operation: random names and ids mostly find nothing, and
    the body would never reach the services."""
    body = case.body if isinstance(case.body, dict | list | str | int | float) else None
    if zlib.crc32(repr((case.path_parameters, case.query, body)).encode()) % 2:
        return
    parameters = case.path_parameters or {}
    if "name" in parameters:
        parameters["name"] = console.locked if case.method == "POST" else console.readable
    if "operation_id" in parameters:
        parameters["operation_id"] = console.operation_id


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_operation_answers_500_or_off_its_document(case, console):
    aim(case, console)
    case.call_and_validate(**console.credentials, checks=CHECKS)


# The hostile requests that once answered 500 or an HTML page (issue 14), replayed as explicit
# cases through the same document and checks; each must be refused with a JSON 400.
UNLOCK, APPROVE = "/api/targets/{name}/force-unlock", "/api/operations/{operation_id}/approve"
REGRESSIONS = {
    "nul in a reason": ("POST", UNLOCK, {}, b'{"reason": "crashed\\u0000deploy"}'),
    "lone surrogate in a reason": ("POST", UNLOCK, {}, b'{"reason": "\\ud800"}'),
    "lone surrogate in a key": ("POST", UNLOCK, {}, b'{"reason": "x", "\\udfff": 1}'),
    "deeply nested body": ("POST", UNLOCK, {}, b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "oversize body": ("POST", UNLOCK, {}, b'{"reason": "' + b"x" * 3_000_000 + b'"}'),
    "nul in an approval reason": ("POST", APPROVE, {}, b'{"reason": "ok\\u0000"}'),
    "nul in a query parameter": ("GET", "/api/migrations/status", {"target": "\x00"}, None),
    "nul in a target name": ("GET", "/api/targets/{name}/flags", {"name": "a\x00b"}, None),
}


@pytest.mark.parametrize("regression", list(REGRESSIONS))
def test_hostile_requests_once_seen_failing_are_json_400s(console, regression):
    method, path, parameters, body = REGRESSIONS[regression]
    operation = schema[path][method]
    path_parameters = {
        name: parameters.get(
            name, {"name": console.locked, "operation_id": console.operation_id}[name]
        )
        for name in ("name", "operation_id")
        if "{" + name + "}" in path
    }
    query = {key: value for key, value in parameters.items() if key not in path_parameters}
    case = operation.Case(
        path_parameters=path_parameters or None,
        query=query or None,
        **({"body": body, "media_type": "application/json"} if body is not None else {}),
    )

    response = case.call_and_validate(**console.credentials, checks=CHECKS)

    assert response.status_code == 400
    assert response.json()["error"]["code"] in {"invalid_request", "invalid_json", "body_too_large"}
