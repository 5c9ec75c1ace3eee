"""Hostile bodies for the API's POST endpoints: each is a JSON 400 that says why, and nothing is
stored; the same text through the CLI is a one-line error."""

import datetime as dt
import io

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import Door, Operation, OperationStatus
from tests.factories import ON_CALL_PERMISSIONS, TargetFactory, UserFactory

pytestmark = pytest.mark.django_db

UNLOCK = "/api/targets/orders/force-unlock"


@pytest.fixture
def orders(pg_target):
    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=20))
    return TargetFactory(db=pg_target, name="orders")


@pytest.fixture
def engineer(client):
    client.force_login(UserFactory(username="oncall", permissions=ON_CALL_PERMISSIONS))
    client.raise_request_exception = False
    return client


def post_raw(client, url, raw, content_type="application/json"):
    return client.generic("POST", url, raw, content_type=content_type)


def assert_json_400(response, code: str, words: str) -> None:
    assert response.status_code == 400, response.content[:300]
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert words in error["message"]
    assert "\n" not in error["message"]


@pytest.mark.parametrize(
    "raw",
    [
        rb'{"reason": "crashed\u0000deploy"}',
        rb'{"reason": "\ud800"}',
        rb'{"reason": "ok", "confirm_name": "\udfff x"}',
        rb'{"reason\u0000": "ok"}',
        rb'{"reason": "ok", "extra": [{"deep": "\u0000"}]}',
    ],
)
def test_a_nul_or_lone_surrogate_in_a_body_is_a_json_400(engineer, orders, raw):
    response = post_raw(engineer, UNLOCK, raw)

    assert_json_400(response, "invalid_json", "NUL character or a lone surrogate")
    assert not Operation.objects.exists()


@pytest.mark.parametrize("depth", [9, 50, 100_000])
def test_a_body_nested_too_deep_is_a_json_400(engineer, orders, depth):
    raw = b'{"reason": "x", "a": ' + b"[" * depth + b"]" * depth + b"}"

    assert_json_400(post_raw(engineer, UNLOCK, raw), "invalid_json", "nested deeper than 8")
    assert not Operation.objects.exists()


def test_a_body_nested_within_the_limit_is_read(engineer, orders):
    raw = b'{"reason": "crashed deploy", "a": ' + b"[" * 6 + b"]" * 6 + b"}"

    assert post_raw(engineer, UNLOCK, raw).status_code == 202


def test_an_oversize_body_is_a_json_400(engineer, orders, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1_000
    raw = b'{"reason": "' + b"x" * 2_000 + b'"}'

    assert_json_400(post_raw(engineer, UNLOCK, raw), "body_too_large", "larger than the 1000")
    assert not Operation.objects.exists()


@pytest.mark.parametrize("debug", [False, True], ids=["production", "debug"])
def test_an_oversize_form_body_read_by_the_csrf_check_is_a_json_400(orders, settings, debug):
    """Would be read before any view (by the CSRF check): refused before it, in JSON, with
    DEBUG on too (where Django would show its debug page)."""
    settings.DEBUG = debug
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1_000
    client = Client(enforce_csrf_checks=True, raise_request_exception=False)
    client.force_login(UserFactory(username="oncall", permissions=ON_CALL_PERMISSIONS))
    client.cookies["csrftoken"] = "a" * 32  # so that the check goes on to read the form

    response = post_raw(
        client, UNLOCK, b"reason=" + b"x" * 2_000, "application/x-www-form-urlencoded"
    )

    assert_json_400(response, "body_too_large", "larger than the 1000")


@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_a_nul_in_a_decision_reason_is_a_json_400(client, orders, decision):
    orders.requires_approval = True
    orders.save()
    requester = UserFactory(username="requester", permissions=ON_CALL_PERMISSIONS)
    operation = services.request_force_unlock(
        actor=Actor.for_user(requester, Door.API), target=orders, reason="stuck"
    )
    client.force_login(
        UserFactory(
            username="approver",
            permissions=[*ON_CALL_PERMISSIONS, "migrations_ops.approve_operation"],
        )
    )
    client.raise_request_exception = False

    response = post_raw(
        client, f"/api/operations/{operation.pk}/{decision}", b'{"reason": "ok\\u0000"}'
    )

    assert_json_400(response, "invalid_json", "NUL character")
    operation.refresh_from_db()
    assert operation.status == OperationStatus.AWAITING_APPROVAL


NOT_UTF8 = b"crashed \xff deploy".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("arguments", "option"),
    [
        (["unlock", "--target", "orders", "--reason", NOT_UTF8], "--reason"),
        (["unlock", "--target", NOT_UTF8, "--reason", "x"], "--target"),
        (
            [
                *("register", "--name", NOT_UTF8, "--url", "sqlite:///x.db"),
                *("--convention", "runbook", "--environment", "staging"),
            ],
            "--name",
        ),
        (["--as", NOT_UTF8, "status"], "--as"),
    ],
)
def test_text_that_is_not_utf8_on_the_command_line_is_a_one_line_error(orders, arguments, option):
    """A command-line argument that is not UTF-8 reaches Python as lone surrogates."""
    with pytest.raises(CommandError) as refused:
        call_command("ops", *arguments, stdout=io.StringIO(), stderr=io.StringIO())
    assert str(refused.value) == (
        f"{option} holds a NUL character or text that is not UTF-8: retype it"
    )
    assert not Operation.objects.exists()


def test_a_service_refuses_a_reason_no_database_can_store(orders):
    on_call = Actor.for_user(UserFactory(username="u", permissions=ON_CALL_PERMISSIONS), Door.API)
    for reason in ("a\x00b", NOT_UTF8):
        with pytest.raises(services.InvalidRequest, match="holds a NUL character or text"):
            services.request_force_unlock(actor=on_call, target=orders, reason=reason)
    assert not Operation.objects.exists()
