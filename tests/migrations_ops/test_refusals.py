"""Refused requests are audit events, at every door: the API's 403 and 400 answers, the admin's
403 pages and refused actions, the CLI's refusals; with who, door, what and why."""

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import AuditEvent, Door
from migrations_ops.roles import CONSOLE_ADMIN
from tests.factories import TargetFactory, UserFactory, member

pytestmark = pytest.mark.django_db


def refused() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action__startswith="refused.").order_by("id"))


def test_an_api_403_is_recorded(client):
    user = UserFactory(username="nosy")  # staff, no permission
    client.force_login(user)

    response = client.get("/api/migrations/status", REMOTE_ADDR="203.0.113.9")

    assert response.status_code == 403
    (event,) = refused()
    assert (event.action, event.actor_name, event.door, event.ip) == (
        "refused.http_403",
        "nosy",
        "api",
        "203.0.113.9",
    )
    assert event.details["message"] == "nosy may not read this"
    assert event.details["path"] == "/api/migrations/status"


def test_an_api_400_is_recorded(client, roles):
    user = member("On-call engineer", "oncall")
    client.force_login(user)
    TargetFactory(name="orders")

    response = client.post(
        "/api/targets/orders/force-unlock", "not json", content_type="application/json"
    )

    assert response.status_code == 400
    (event,) = refused()
    assert (event.action, event.door) == ("refused.http_400", "api")
    assert event.details["message"] == "the request body is not valid JSON"


def test_an_anonymous_403_is_not_recorded(client):
    assert client.get("/api/migrations/status").status_code in (401, 403)
    assert refused() == []


def test_an_admin_page_the_user_may_not_open_is_recorded(client):
    user = UserFactory(username="nosy")
    client.force_login(user)

    response = client.get(reverse("admin:migrations_ops_apitoken_add"))

    assert response.status_code == 403
    (event,) = refused()
    assert (event.action, event.actor_name, event.door) == ("refused.http_403", "nosy", "admin")
    assert event.details["path"] == "/admin/migrations_ops/apitoken/add/"


def test_an_admin_action_refused_by_a_service_is_recorded(client, roles):
    admin_user = member(CONSOLE_ADMIN, "admin-ann")
    token, _ = services.create_api_token(
        actor=Actor.for_user(admin_user, Door.CLI), name="shop", targets=[TargetFactory()]
    )
    services.revoke_api_token(actor=Actor.for_user(admin_user, Door.CLI), token=token)
    client.force_login(admin_user)

    client.post(
        reverse("admin:migrations_ops_apitoken_changelist"),
        {"action": "revoke", "_selected_action": [token.pk]},
    )

    (event,) = refused()
    assert (event.action, event.actor_name, event.door) == (
        "refused.revoke_api_token",
        "admin-ann",
        "admin",
    )
    assert event.details["refusal"] == "InvalidRequest"
    assert "was already revoked" in event.details["message"]
    assert (event.object_model, event.object_id) == ("migrations_ops.apitoken", token.pk)


def test_a_cli_refusal_is_recorded():
    UserFactory(username="stranger")

    with pytest.raises(CommandError, match="stranger is not allowed to view the audit trail"):
        call_command("ops", "--as", "stranger", "audit-verify")

    (event,) = refused()
    assert (event.action, event.actor_name, event.door) == (
        "refused.cli.audit-verify",
        "stranger",
        "cli",
    )
    assert event.details["message"] == "stranger is not allowed to view the audit trail"


def test_an_admin_confirmation_posted_with_errors_is_recorded(client, roles, pg_target):
    client.force_login(member("On-call engineer", "oncall"))
    target = TargetFactory(db=pg_target, name="orders")

    response = client.post(
        reverse("admin:migrations_ops_target_force_unlock", args=[target.pk]), {"reason": ""}
    )

    assert response.status_code == 200
    (event,) = refused()
    assert (event.action, event.actor_name, event.target_name) == (
        "refused.force_unlock",
        "oncall",
        "orders",
    )
    assert event.details["refusal"] == "InvalidRequest"
    assert "This field is required." in event.details["message"]


def test_an_unknown_name_is_answered_but_is_no_refusal():
    with pytest.raises(CommandError, match="nowhere"):
        call_command("ops", "flags", "--target", "nowhere")

    assert refused() == []
