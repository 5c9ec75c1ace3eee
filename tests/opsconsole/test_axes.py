"""Login throttling (django-axes): repeated failed logins lock out the user name from that
address; console admins see the lock-out in the admin; `axes_reset` lifts it."""

import io

import pytest
from django.core.management import call_command

from migrations_ops.roles import AUDITOR, CONSOLE_ADMIN
from tests.factories import UserFactory, member

PASSWORD = "correct horse battery staple"  # UserFactory's
LOGIN = "/admin/login/?next=/admin/"


def log_in(client, username, password, address="127.0.0.1"):
    return client.post(LOGIN, {"username": username, "password": password}, REMOTE_ADDR=address)


def fail_until_locked(client, settings, username):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        response = log_in(client, username, "wrong password")
    return response


@pytest.mark.django_db
def test_failed_logins_lock_the_account_out_even_with_the_right_password(client, settings):
    assert settings.AXES_FAILURE_LIMIT == 5
    UserFactory(username="oncall")

    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        response = log_in(client, "oncall", "wrong password")
        assert response.status_code == 200
        assert "Please enter the correct username and password" in response.text
    response = log_in(client, "oncall", "wrong password")
    assert response.status_code == 429

    response = log_in(client, "oncall", PASSWORD)
    assert response.status_code == 429
    assert "Account locked: too many login attempts" in response.text
    assert client.get("/admin/").status_code == 302  # still not logged in


@pytest.mark.django_db
def test_the_lock_out_holds_for_the_name_from_that_address_only(client, settings):
    UserFactory(username="oncall")
    fail_until_locked(client, settings, "oncall")

    # The account's owner, elsewhere, is not locked out by someone guessing their password.
    response = log_in(client, "oncall", PASSWORD, address="10.20.30.40")
    assert response.status_code == 302
    assert response["Location"] == "/admin/"


@pytest.mark.django_db
def test_console_admins_see_lock_outs_and_auditors_do_not(client, settings, roles):
    UserFactory(username="oncall")
    fail_until_locked(client, settings, "oncall")

    client.force_login(member(CONSOLE_ADMIN))
    index = client.get("/admin/")
    assert "/admin/axes/accessattempt/" in index.text
    attempts = client.get("/admin/axes/accessattempt/?locked_out=yes")
    assert attempts.status_code == 200
    assert "oncall" in attempts.text
    assert PASSWORD not in attempts.text
    failures = client.get("/admin/axes/accessfailurelog/")
    assert failures.status_code == 200
    assert "oncall" in failures.text

    client.force_login(member(AUDITOR))
    assert client.get("/admin/axes/accessattempt/").status_code == 403


@pytest.mark.django_db
def test_a_console_admin_lifts_a_lock_out_in_the_admin(client, settings, roles):
    from axes.models import AccessAttempt

    UserFactory(username="oncall")
    fail_until_locked(client, settings, "oncall")
    attempt = AccessAttempt.objects.get(username="oncall")

    admin = member(CONSOLE_ADMIN)
    client.force_login(admin)
    response = client.post(
        "/admin/axes/accessattempt/",
        {"action": "delete_selected", "_selected_action": [attempt.pk], "post": "yes"},
    )
    assert response.status_code == 302
    client.logout()

    assert log_in(client, "oncall", PASSWORD).status_code == 302


@pytest.mark.django_db
def test_axes_reset_lifts_the_lock_out(client, settings):
    UserFactory(username="oncall")
    fail_until_locked(client, settings, "oncall")
    assert log_in(client, "oncall", PASSWORD).status_code == 429

    out = io.StringIO()
    call_command("axes_reset", stdout=out)
    assert "1 attempts removed" in out.getvalue()

    response = log_in(client, "oncall", PASSWORD)
    assert response.status_code == 302
    assert client.get("/admin/").status_code == 200


@pytest.mark.django_db
def test_behind_a_proxy_the_client_address_is_the_one_the_proxy_saw(client, settings):
    settings.TRUSTED_PROXY_COUNT = 1
    UserFactory(username="oncall")

    def through_proxy(client_address, password):
        return client.post(
            LOGIN,
            {"username": "oncall", "password": password},
            REMOTE_ADDR="10.0.0.1",  # the proxy, the same for everyone
            # A client may send its own X-Forwarded-For: only the proxy's last entry counts.
            HTTP_X_FORWARDED_FOR=f"198.51.100.7, {client_address}",
        )

    for _ in range(settings.AXES_FAILURE_LIMIT):
        through_proxy("203.0.113.9", "wrong password")
    assert through_proxy("203.0.113.9", PASSWORD).status_code == 429

    response = through_proxy("192.0.2.44", PASSWORD)
    assert response.status_code == 302
