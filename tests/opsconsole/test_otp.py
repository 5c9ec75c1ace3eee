"""Two-factor authentication for the admin (django-otp): when turned on, console admins and
incident commanders give a TOTP token; everyone else logs in as before."""

import pytest
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice

from migrations_ops.roles import AUDITOR, CONSOLE_ADMIN, INCIDENT_COMMANDER
from tests.factories import member

PASSWORD = "correct horse battery staple"  # UserFactory's
LOGIN = "/admin/login/?next=/admin/"


@pytest.fixture
def otp_required(settings, roles):
    settings.OTP_REQUIRED_GROUPS = [CONSOLE_ADMIN, INCIDENT_COMMANDER]


def token_of(device: TOTPDevice) -> str:
    return f"{totp(device.bin_key, step=device.step, digits=device.digits):0{device.digits}d}"


def log_in(client, username, otp_token=""):
    return client.post(LOGIN, {"username": username, "password": PASSWORD, "otp_token": otp_token})


@pytest.mark.django_db
def test_a_commander_without_a_device_is_refused_and_asked_for_the_token(client, otp_required):
    member(INCIDENT_COMMANDER, username="commander")

    for token in ["", "123456"]:
        response = log_in(client, "commander", otp_token=token)
        assert response.status_code == 200
        assert "OTP Token" in response.text
        assert "Your account needs a two-factor device (TOTP)" in response.text
        assert client.get("/admin/").status_code == 302


@pytest.mark.django_db
def test_a_commander_gets_in_with_a_valid_token(client, otp_required):
    commander = member(INCIDENT_COMMANDER, username="commander")
    device = TOTPDevice.objects.create(user=commander, name="phone", confirmed=True)

    assert "Please enter your OTP token." in log_in(client, "commander").text

    response = log_in(client, "commander", otp_token=token_of(device))
    assert response.status_code == 302
    assert response["Location"] == "/admin/"
    assert client.get("/admin/").status_code == 200


@pytest.mark.django_db
def test_a_wrong_token_is_refused(client, otp_required):
    commander = member(INCIDENT_COMMANDER, username="commander")
    device = TOTPDevice.objects.create(user=commander, name="phone", confirmed=True)
    wrong = f"{(int(token_of(device)) + 1) % 1_000_000:06d}"

    response = log_in(client, "commander", otp_token=wrong)
    assert "Invalid token." in response.text
    assert client.get("/admin/").status_code == 302


@pytest.mark.django_db
def test_a_session_not_verified_by_a_device_is_refused_the_admin(client, otp_required):
    admin = member(CONSOLE_ADMIN)
    TOTPDevice.objects.create(user=admin, name="phone", confirmed=True)
    client.force_login(admin)  # a password-only session, as before two factors were on

    response = client.get("/admin/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
    assert "OTP Token" in client.get(response["Location"]).text


@pytest.mark.django_db
def test_an_auditor_gets_in_without_a_token(client, otp_required):
    member(AUDITOR, username="auditor")

    response = log_in(client, "auditor")
    assert response.status_code == 302
    assert client.get("/admin/").status_code == 200


@pytest.mark.django_db
def test_off_by_default_a_commander_logs_in_with_a_password(client, settings, roles):
    assert settings.OTP_REQUIRED_GROUPS == []
    member(INCIDENT_COMMANDER, username="commander")

    response = client.get(LOGIN)
    assert "OTP Token" not in response.text
    assert log_in(client, "commander").status_code == 302
    assert client.get("/admin/").status_code == 200


@pytest.mark.django_db
def test_console_admins_manage_totp_devices(client, otp_required):
    admin = member(CONSOLE_ADMIN, username="admin")
    device = TOTPDevice.objects.create(user=admin, name="phone", confirmed=True)
    assert log_in(client, "admin", otp_token=token_of(device)).status_code == 302
    commander = member(INCIDENT_COMMANDER, username="commander")

    assert client.get("/admin/otp_totp/totpdevice/").status_code == 200
    response = client.post(
        "/admin/otp_totp/totpdevice/add/",
        {
            "user": commander.pk,
            "name": "commander's phone",
            "key": TOTPDevice().key,
            "step": 30,
            "t0": 0,
            "digits": 6,
            "tolerance": 1,
            "drift": 0,
            "throttling_failure_count": 0,
            "confirmed": "on",
        },
    )
    assert response.status_code == 302, response.text
    assert TOTPDevice.objects.filter(user=commander, confirmed=True).exists()


@pytest.mark.django_db
def test_the_api_refuses_a_session_not_verified_by_a_device(client, otp_required):
    commander = member(INCIDENT_COMMANDER, username="commander")
    device = TOTPDevice.objects.create(user=commander, name="phone", confirmed=True)
    client.force_login(commander)  # a password-only session, as before two factors were on

    response = client.get("/api/migrations/status")
    assert response.status_code == 401
    assert response.json()["error"] == {
        "code": "not_verified",
        "message": "log in to the admin again with your TOTP token",
    }

    client.logout()
    assert log_in(client, "commander", otp_token=token_of(device)).status_code == 302
    assert client.get("/api/migrations/status").status_code == 200
