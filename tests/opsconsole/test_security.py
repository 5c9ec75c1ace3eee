"""Django's debug error page (DEBUG is on for the embedded console) shows no secret: settings,
the environment, POST data, the traceback's variables and the exception's message are shown
with their URLs masked (by parsing them) and secret-named values hidden."""

from __future__ import annotations

import uuid

import pytest
from cryptography.fernet import Fernet
from django.conf import settings as django_settings
from django.db import connection
from django.test import Client
from django.urls import path, reverse

from migrations_ops.fields import PREFIX
from migrations_ops.models import Target
from tests.factories import TargetFactory, UserFactory

MARKER = f"pw-DEBUG-{uuid.uuid4().hex}"
REDIS_WITH_PASSWORD = f"redis://:{MARKER}@127.0.0.1:6379/15"
TARGET_WITH_PASSWORD = f"postgresql://app:{MARKER}@db.internal:5432/orders"


@pytest.fixture
def debug(settings):
    """DEBUG on, and the marker as the password of every URL-valued setting the page shows."""
    settings.DEBUG = True
    settings.REDIS_URL = REDIS_WITH_PASSWORD
    settings.CELERY_BROKER_URL = REDIS_WITH_PASSWORD
    settings.CELERY_RESULT_BACKEND = f"{REDIS_WITH_PASSWORD}?password={MARKER}"
    settings.CACHES = {
        **settings.CACHES,
        # Never used by the test (a cache connects only when first used): only shown.
        "spare": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": [REDIS_WITH_PASSWORD, f"rediss://user:{MARKER}@cache:6380/0"],
        },
    }
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": 60,
        "sentinel_kwargs": {"password": MARKER},
        "fallbacks": [REDIS_WITH_PASSWORD],
    }
    settings.AUDIT_CHAIN_KEY = MARKER
    return settings


def looks_at(page) -> str:
    text = page.content.decode()
    assert page.status_code == 500
    assert "Traceback" in text and "REDIS_URL" in text, "not Django's debug page"
    return text


@pytest.mark.django_db
def test_the_debug_page_of_an_admin_error_shows_no_password(debug, settings):
    # A URL encrypted with a key the console no longer holds: its page fails.
    lost = TargetFactory(name="lost-key")
    stored = PREFIX + Fernet(Fernet.generate_key()).encrypt(TARGET_WITH_PASSWORD.encode()).decode()
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Target._meta.db_table} SET connection_url = %s WHERE id = %s",
            [stored, lost.pk],
        )
    client = Client(raise_request_exception=False)
    client.force_login(UserFactory(username="root", is_superuser=True))

    page = client.post(
        reverse("admin:migrations_ops_target_change", args=[lost.pk]),
        {"name": "lost-key", "connection_url": TARGET_WITH_PASSWORD, "password": MARKER},
        # What runserver puts in META: the process's environment.
        DATABASE_URL=f"postgres://postgres:{MARKER}@127.0.0.1:5432/opsconsole",
        REDIS_URL=REDIS_WITH_PASSWORD,
    )

    text = looks_at(page)
    assert "redis://:***@127.0.0.1:6379/15" in text  # the settings are there, masked
    assert "postgresql://app:***@db.internal:5432/orders" in text  # and the POST
    assert "postgres://postgres:***@127.0.0.1:5432/opsconsole" in text  # and the environment
    for secret in (MARKER, settings.TARGET_SECRET_KEY[0], settings.SECRET_KEY):
        assert secret not in text


def failing_view(request):
    """An error whose traceback holds a target's URL: a local, an argument, the message."""
    url = TARGET_WITH_PASSWORD
    urls = {"target": url, "cache": [django_settings.REDIS_URL]}
    raise RuntimeError(f"cannot reach {url} ({len(urls)})")


urlpatterns = [path("fails/", failing_view)]


@pytest.mark.urls(__name__)
def test_the_debug_page_masks_the_traceback_variables_and_the_message(debug):
    page = Client(raise_request_exception=False).get(
        "/fails/", {"token": MARKER, "next": TARGET_WITH_PASSWORD}
    )

    text = looks_at(page)
    assert "cannot reach postgresql://app:***@db.internal:5432/orders" in text
    assert MARKER not in text


def test_settings_are_cleansed_at_any_depth():
    from opsconsole.security import SecretsExceptionReporterFilter

    databases = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": "db.internal",
            "USER": "console",
            "PASSWORD": MARKER,
            "OPTIONS": {"service": "x", "replicas": [TARGET_WITH_PASSWORD]},
        }
    }

    shown = SecretsExceptionReporterFilter().cleanse_setting("DATABASES", databases)

    assert shown["default"]["HOST"] == "db.internal"
    assert shown["default"]["PASSWORD"] == "********************"
    assert shown["default"]["OPTIONS"]["replicas"] == [
        "postgresql://app:***@db.internal:5432/orders"
    ]
    assert MARKER not in repr(shown)
