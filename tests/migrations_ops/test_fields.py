"""Target connection URLs are stored encrypted: a dump of the console's database does not give
the passwords away, and the console still connects."""

import importlib
import io

import pytest
from cryptography.fernet import Fernet
from django.apps import apps
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.urls import reverse

from migrations_ops import services
from migrations_ops.fields import SecretKeyError
from migrations_ops.models import Target
from tests.factories import TargetFactory

PASSWORD = "pw-7Qx2-marker"  # trust authentication on the test server ignores it


def with_password(url: str) -> str:
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


def stored_url(target: Target) -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT connection_url FROM migrations_ops_target WHERE id = %s", [target.pk]
        )
        return cursor.fetchone()[0]


@pytest.mark.django_db
def test_the_stored_url_hides_the_password_and_the_target_still_connects(pg_target):
    pg_target.create_runbook_books()
    target = TargetFactory(db=pg_target, connection_url=with_password(pg_target.url))

    with connection.cursor() as cursor:
        cursor.execute("SELECT connection_url FROM migrations_ops_target")
        dumped = " ".join(row[0] for row in cursor.fetchall())
    assert PASSWORD not in dumped
    assert "127.0.0.1" not in dumped  # the whole URL is encrypted, host included

    target = Target.objects.get(pk=target.pk)
    assert target.connection_url == with_password(pg_target.url)
    status = services.read_target_status(target)
    assert status.error is None
    assert status.observation.held is False


@pytest.mark.django_db
def test_dumpdata_writes_the_url_encrypted():
    target = TargetFactory(connection_url=f"postgresql://app:{PASSWORD}@db.internal:5432/orders")
    out = io.StringIO()
    call_command("dumpdata", "migrations_ops.target", stdout=out)
    assert target.name in out.getvalue()
    assert PASSWORD not in out.getvalue()


@pytest.mark.django_db
def test_urls_stored_before_encryption_are_encrypted_by_the_migration():
    target = TargetFactory()
    plain = f"postgresql://app:{PASSWORD}@db.internal:5432/orders"
    with connection.cursor() as cursor:  # as a console stored it before migration 0012
        cursor.execute(
            "UPDATE migrations_ops_target SET connection_url = %s WHERE id = %s",
            [plain, target.pk],
        )
    assert Target.objects.get(pk=target.pk).connection_url == plain  # still readable

    migration = importlib.import_module("migrations_ops.migrations.0012_encrypt_connection_urls")
    migration.encrypt_urls(apps, None)

    assert PASSWORD not in stored_url(target)
    assert Target.objects.get(pk=target.pk).connection_url == plain


@pytest.mark.django_db
def test_rotate_secrets_moves_every_url_to_the_new_key(settings):
    old_key, new_key = settings.TARGET_SECRET_KEY[0], Fernet.generate_key().decode()
    url = f"postgresql://app:{PASSWORD}@db.internal:5432/orders"
    target = TargetFactory(connection_url=url)

    settings.TARGET_SECRET_KEY = [new_key, old_key]
    out = io.StringIO()
    call_command("ops", "rotate-secrets", stdout=out)
    assert "re-encrypted 1 connection URL with the first key" in out.getvalue()

    settings.TARGET_SECRET_KEY = [new_key]  # the old key is gone: nothing needs it now
    assert Target.objects.get(pk=target.pk).connection_url == url
    assert PASSWORD not in stored_url(target)


@pytest.mark.django_db
def test_a_url_without_its_key_is_refused_clearly(settings):
    TargetFactory(name="orders", connection_url="postgresql://app:pw@db.internal:5432/orders")
    settings.TARGET_SECRET_KEY = [Fernet.generate_key().decode()]

    with pytest.raises(SecretKeyError, match="TARGET_SECRET_KEY no longer holds the key"):
        Target.objects.get(name="orders")
    with pytest.raises(CommandError, match="TARGET_SECRET_KEY no longer holds the key"):
        call_command("ops", "rotate-secrets", stdout=io.StringIO())


@pytest.mark.django_db
def test_a_malformed_key_is_named(settings):
    settings.TARGET_SECRET_KEY = ["not-a-key"]
    with pytest.raises(SecretKeyError, match="key 1 is not a Fernet key"):
        TargetFactory()


# --- the admin never shows the plain text ----------------------------------------------------
@pytest.mark.django_db
def test_the_admin_shows_the_field_read_only_without_its_value(client, monkeypatch):
    """A page someone adds later that shows the field itself (a list column, a read-only
    field) shows the admin's empty value, never the decrypted URL."""
    from migrations_ops.admin.targets import TargetAdmin
    from migrations_ops.checks import no_secret_in_admin_options
    from tests.factories import UserFactory

    target = TargetFactory(connection_url=f"postgresql://app:{PASSWORD}@db.internal/orders")
    monkeypatch.setattr(TargetAdmin, "list_display", ["name", "connection_url"])
    monkeypatch.setattr(
        TargetAdmin, "readonly_fields", [*TargetAdmin.readonly_fields, "connection_url"]
    )
    client.force_login(UserFactory(username="root", is_superuser=True))

    pages = [
        client.get(reverse("admin:migrations_ops_target_changelist")),
        client.get(reverse("admin:migrations_ops_target_change", args=[target.pk])),
    ]

    for page in pages:
        assert page.status_code == 200
        assert target.name in page.content.decode()
        assert PASSWORD not in page.content.decode()
    # ... and the system checks name such an admin.
    errors = {error.msg for error in no_secret_in_admin_options()}
    assert errors == {
        "TargetAdmin.list_display names the encrypted field 'connection_url': the admin "
        "would show or query its plain text",
        "TargetAdmin.readonly_fields names the encrypted field 'connection_url': the admin "
        "would show or query its plain text",
    }


def test_the_system_checks_pass_on_the_console_as_it_is():
    from migrations_ops.checks import no_secret_in_admin_options

    assert no_secret_in_admin_options() == []
