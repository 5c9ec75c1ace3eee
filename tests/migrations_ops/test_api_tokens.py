"""API tokens: created (services, admin, ``ops token``), shown once, stored hashed, revoked."""

import io

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import ApiToken, AuditEvent, Door
from migrations_ops.roles import CONSOLE_ADMIN, ON_CALL
from tests.factories import TargetFactory, member

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]

FLAGS = "/api/targets/{}/flags"


@pytest.fixture
def console_admin():
    return Actor.for_user(member(CONSOLE_ADMIN, "admin1"), Door.ADMIN)


@pytest.fixture
def orders():
    return TargetFactory(name="orders-db")


@pytest.fixture
def billing():
    return TargetFactory(name="billing-db")


def bearer(raw):
    return {"HTTP_AUTHORIZATION": f"Bearer {raw}"}


def everything_stored_about(token: ApiToken) -> str:
    rows = [ApiToken.objects.filter(pk=token.pk).values().get()]
    rows += list(AuditEvent.objects.values())
    return repr(rows)


# --- services ----------------------------------------------------------------------------------
def test_a_created_token_reads_its_targets_and_only_its_hash_is_kept(
    client, console_admin, orders, billing
):
    token, raw = services.create_api_token(actor=console_admin, name="orders-app", targets=[orders])

    assert raw.startswith("opc_") and len(raw) > 40
    assert token.prefix == raw[:12]
    assert token.token_hash == services.hash_api_token(raw)
    assert raw not in everything_stored_about(token)
    assert client.get(FLAGS.format("orders-db"), **bearer(raw)).status_code == 200
    assert client.get(FLAGS.format("billing-db"), **bearer(raw)).status_code == 403
    event = AuditEvent.objects.get(action="api_token.created")
    assert event.actor_name == "admin1"
    assert event.details["prefix"] == token.prefix
    assert event.details["targets"] == ["orders-db"]


def test_two_tokens_differ(console_admin, orders):
    _, first = services.create_api_token(actor=console_admin, name="a", targets=[orders])
    _, second = services.create_api_token(actor=console_admin, name="b", targets=[orders])
    assert first != second and first[:12] != second[:12]


@pytest.mark.parametrize(
    ("name", "with_target", "message"),
    [("", True, "needs a name"), ("app", False, "at least one target")],
)
def test_a_token_without_name_or_target_is_refused(
    console_admin, orders, name, with_target, message
):
    with pytest.raises(services.InvalidRequest, match=message):
        services.create_api_token(
            actor=console_admin, name=name, targets=[orders] if with_target else []
        )
    assert not ApiToken.objects.exists()
    assert not AuditEvent.objects.filter(action="api_token.created").exists()


def test_an_on_call_engineer_may_not_create_or_revoke_tokens(console_admin, orders):
    on_call = Actor.for_user(member(ON_CALL, "oncall"), Door.ADMIN)
    with pytest.raises(services.PermissionDenied):
        services.create_api_token(actor=on_call, name="app", targets=[orders])
    token, _ = services.create_api_token(actor=console_admin, name="app", targets=[orders])
    with pytest.raises(services.PermissionDenied):
        services.revoke_api_token(actor=on_call, token=token)
    token.refresh_from_db()
    assert token.revoked_at is None


def test_a_revoked_token_is_refused_at_once_even_after_being_used(client, console_admin, orders):
    token, raw = services.create_api_token(actor=console_admin, name="app", targets=[orders])
    assert client.get(FLAGS.format("orders-db"), **bearer(raw)).status_code == 200  # now cached

    services.revoke_api_token(actor=console_admin, token=token)

    response = client.get(FLAGS.format("orders-db"), **bearer(raw))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_token"
    token.refresh_from_db()
    assert token.revoked_at is not None and token.revoked_by_name == "admin1"
    assert AuditEvent.objects.filter(action="api_token.revoked").count() == 1


def test_without_redis_a_token_revoked_by_another_process_is_refused_at_once(
    client, console_admin, orders
):
    """Without Redis each process's cache is its own: the CLI's ``ops token revoke`` (another
    process, here its UPDATE) cannot make the web process forget a token it remembers."""
    token, raw = services.create_api_token(actor=console_admin, name="app", targets=[orders])
    assert client.get(FLAGS.format("orders-db"), **bearer(raw)).status_code == 200

    ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now(), revoked_by_name="cli")

    response = client.get(FLAGS.format("orders-db"), **bearer(raw))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_token"


def test_revoking_twice_is_refused(console_admin, orders):
    token, _ = services.create_api_token(actor=console_admin, name="app", targets=[orders])
    services.revoke_api_token(actor=console_admin, token=token)
    with pytest.raises(services.InvalidRequest, match="already revoked"):
        services.revoke_api_token(actor=console_admin, token=token)
    assert AuditEvent.objects.filter(action="api_token.revoked").count() == 1


def test_using_a_token_notes_when_it_was_last_used(client, console_admin, orders):
    token, raw = services.create_api_token(actor=console_admin, name="app", targets=[orders])
    assert token.last_used_at is None
    client.get(FLAGS.format("orders-db"), **bearer(raw))
    token.refresh_from_db()
    assert token.last_used_at is not None


# --- admin -------------------------------------------------------------------------------------
def test_the_admin_creates_a_token_shows_it_once_and_never_again(client, orders, billing):
    client.force_login(member(CONSOLE_ADMIN, "admin1"))

    response = client.post(
        reverse("admin:migrations_ops_apitoken_add"),
        {"name": "orders-app", "targets": [orders.pk, billing.pk]},
    )

    assert response.status_code == 200
    token = ApiToken.objects.get()
    raw = response.context["raw_token"]
    assert raw.startswith(token.prefix)
    assert raw in response.content.decode()
    assert "only time it is shown" in response.content.decode()
    assert "no-store" in response["Cache-Control"]
    assert token.created_by_name == "admin1"
    assert {t.name for t in token.targets.all()} == {"orders-db", "billing-db"}
    assert raw not in everything_stored_about(token)
    assert client.get(FLAGS.format("billing-db"), **bearer(raw)).status_code == 200

    for page in (
        reverse("admin:migrations_ops_apitoken_changelist"),
        reverse("admin:migrations_ops_apitoken_change", args=[token.pk]),
    ):
        content = client.get(page).content.decode()
        assert token.prefix in content
        assert raw not in content
        assert token.token_hash not in content


def test_the_admin_add_form_needs_a_target(client):
    client.force_login(member(CONSOLE_ADMIN, "admin1"))
    response = client.post(reverse("admin:migrations_ops_apitoken_add"), {"name": "app"})
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["targets"]
    assert not ApiToken.objects.exists()


def test_the_admin_revokes_with_an_action_and_never_edits_or_deletes(client, console_admin, orders):
    token, raw = services.create_api_token(actor=console_admin, name="app", targets=[orders])
    client.force_login(member(CONSOLE_ADMIN, "admin2"))

    response = client.post(
        reverse("admin:migrations_ops_apitoken_changelist"),
        {"action": "revoke", "_selected_action": [token.pk]},
        follow=True,
    )

    assert "Revoked: app" in " ".join(str(m) for m in response.context["messages"])
    token.refresh_from_db()
    assert token.revoked_by_name == "admin2"
    assert client.get(FLAGS.format("orders-db"), **bearer(raw)).status_code == 401
    change_page = client.get(reverse("admin:migrations_ops_apitoken_change", args=[token.pk]))
    assert 'name="name"' not in change_page.content.decode()  # read-only
    delete = client.get(reverse("admin:migrations_ops_apitoken_delete", args=[token.pk]))
    assert delete.status_code == 403

    again = client.post(
        reverse("admin:migrations_ops_apitoken_changelist"),
        {"action": "revoke", "_selected_action": [token.pk]},
        follow=True,
    )
    assert "already revoked" in " ".join(str(m) for m in again.context["messages"])


# --- CLI ---------------------------------------------------------------------------------------
def ops(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("ops", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_ops_token_create_prints_the_token_alone_then_list_and_revoke(client, orders, billing):
    out, err = ops("token", "create", "--name", "billing-app", "--targets", "orders-db,billing-db")

    (raw,) = out.splitlines()
    token = ApiToken.objects.get()
    assert raw.startswith(token.prefix)
    assert "shown this once" in err and raw not in err
    assert raw not in everything_stored_about(token)
    assert client.get(FLAGS.format("billing-db"), **bearer(raw)).status_code == 200

    listed, _ = ops("token", "list")
    assert token.prefix in listed and "targets=billing-db,orders-db" in listed
    assert "active" in listed and raw not in listed

    out, _ = ops("token", "revoke", token.prefix)
    assert "revoked" in out
    assert client.get(FLAGS.format("billing-db"), **bearer(raw)).status_code == 401
    listed, _ = ops("token", "list")
    assert "revoked" in listed


def test_ops_token_errors_are_one_line_and_change_nothing(orders):
    with pytest.raises(CommandError, match="unknown target 'nope'"):
        ops("token", "create", "--name", "app", "--targets", "orders-db,nope")
    with pytest.raises(CommandError, match="at least one target"):
        ops("token", "create", "--name", "app", "--targets", ",")
    assert not ApiToken.objects.exists()
    with pytest.raises(CommandError, match="no API token with prefix"):
        ops("token", "revoke", "opc_missing1")


def test_ops_token_as_an_on_call_engineer_is_refused(orders):
    member(ON_CALL, "oncall")
    with pytest.raises(CommandError, match="not allowed to create API tokens"):
        ops("--as", "oncall", "token", "create", "--name", "app", "--targets", "orders-db")
    assert not ApiToken.objects.exists()
