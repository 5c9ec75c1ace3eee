"""Production settings: they refuse to start on a weak secret or without the key that encrypts
target connection URLs, and pass Django's deployment checks with no warning."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parents[2]
STRONG_SECRET = secrets.token_urlsafe(64)


def run_production(
    *args: str, secret_key: str | None = STRONG_SECRET, **environment: str
) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in {
            "SECRET_KEY",
            "DEBUG",
            "TARGET_SECRET_KEY",
            "AUDIT_CHAIN_KEY",
            "OTP_REQUIRED_GROUPS",
        }
    }
    env.update(
        DJANGO_SETTINGS_MODULE="opsconsole.settings_production",
        ALLOWED_HOSTS="ops.example.com",
        TARGET_SECRET_KEY=Fernet.generate_key().decode(),
        AUDIT_CHAIN_KEY=secrets.token_urlsafe(48),
    )
    env.update(environment)
    if secret_key is not None:
        env["SECRET_KEY"] = secret_key
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "secret_key",
    [
        None,
        "",
        "django-insecure-opsconsole-development-only",
        "short",
        secrets.token_urlsafe(30),  # random, but 40 characters
        "a" * 60,
        "ab" * 30,  # long, but four different characters at most
    ],
)
def test_production_settings_refuse_a_weak_secret_key(secret_key):
    result = run_production("check", secret_key=secret_key)
    assert result.returncode != 0
    assert "SECRET_KEY must be set to a random value of at least 50 characters" in result.stderr


def test_production_settings_pass_the_deployment_checks():
    result = run_production("check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_with_two_factors_required_the_deployment_checks_still_pass():
    result = run_production(
        "check", "--deploy", "--fail-level", "WARNING", ADMIN_OTP_REQUIRED="true"
    )
    assert result.returncode == 0, result.stderr


def test_production_settings_require_the_target_secret_key():
    result = run_production("check", TARGET_SECRET_KEY="")
    assert result.returncode != 0
    assert "TARGET_SECRET_KEY must be set in production" in result.stderr


def test_production_settings_name_a_malformed_target_secret_key():
    keys = f"{Fernet.generate_key().decode()},not-a-fernet-key"
    result = run_production("check", TARGET_SECRET_KEY=keys)
    assert result.returncode != 0
    assert "TARGET_SECRET_KEY: key 2 is not a Fernet key" in result.stderr


@pytest.mark.parametrize("audit_key", ["", "too-short-to-be-a-secret"])
def test_production_settings_require_a_long_audit_chain_key(audit_key):
    result = run_production("check", AUDIT_CHAIN_KEY=audit_key)
    assert result.returncode != 0
    assert "AUDIT_CHAIN_KEY must be set in production" in result.stderr


def health_check_networks(settings_module: str, **environment: str) -> str:
    shown = "from django.conf import settings; print(settings.HEALTH_CHECK_ALLOWED_NETWORKS)"
    result = run_production(
        "shell", "-c", shown, DJANGO_SETTINGS_MODULE=settings_module, **environment
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]  # after what the shell says of itself


def test_health_checks_reach_loopback_in_development_and_nothing_private_in_production():
    assert health_check_networks("opsconsole.settings") == "['127.0.0.0/8', '::1/128']"
    assert health_check_networks("opsconsole.settings_production") == "[]"
    named = health_check_networks(
        "opsconsole.settings_production", HEALTH_CHECK_ALLOWED_NETWORKS="10.20.0.0/16,fd12::/64"
    )
    assert named == "['10.20.0.0/16', 'fd12::/64']"


def test_a_health_check_network_that_is_not_one_stops_the_start():
    result = run_production("check", HEALTH_CHECK_ALLOWED_NETWORKS="10.0.0.0/8,intranet")
    assert result.returncode != 0
    assert (
        "HEALTH_CHECK_ALLOWED_NETWORKS: 'intranet' is not a network (e.g. 10.0.0.0/8)"
        in result.stderr
    )
