"""Names and versions typed by people reach a target's SQL only as quoted identifiers or
parameters: injection attempts through every door get a clear refusal and leave the target
as it was."""

import datetime as dt
import io

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from migrations_ops import services
from migrations_ops.models import Environment, Operation, Target
from tests.factories import TargetFactory, UserFactory

DROP_BOOKS = 'x"; DROP TABLE migrations; --'
DELETE_LOCK = "'; DELETE FROM migration_lock; --"
ATTEMPTS = [DROP_BOOKS, DELETE_LOCK, "003'; DROP TABLE users; --", 'public"."migrations']


def snapshot(target_db) -> dict:
    """Everything an injection could have touched on the target."""
    return {
        "tables": target_db.query(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = %s ORDER BY table_name",
            [target_db.schema],
        ),
        "books": target_db.query("SELECT filename FROM migrations ORDER BY filename"),
        "lock": target_db.runbook_lock_rows(),
        "schemas": target_db.query(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE '%%;%%'"
        ),
    }


@pytest.fixture
def shop(pg_target, tmp_path):
    """A PostgreSQL target with its books, a stale lock and its scripts imported."""
    from tests.scripts_folder import EMAIL, ORDERS, USERS, apply_directly, write_folder

    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=30), locked_by="deploy-9")
    apply_directly(pg_target, USERS, EMAIL)
    target = TargetFactory(db=pg_target, name="shop", environment=Environment.PRODUCTION)
    folder = write_folder(tmp_path / "migrations", USERS, EMAIL, ORDERS)
    call_command("ops", "import", "--target", "shop", "--dir", str(folder), stdout=io.StringIO())
    return pg_target, target


def ops(*args) -> str:
    out = io.StringIO()
    call_command("ops", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


# --- the admin ------------------------------------------------------------------------------------
@pytest.mark.django_db
@pytest.mark.parametrize("schema", [DROP_BOOKS, DELETE_LOCK, 'a"b', "x; y", "1st"])
def test_the_admin_refuses_a_schema_name_that_is_not_a_name(client, shop, schema):
    target_db, target = shop
    before = snapshot(target_db)
    client.force_login(UserFactory(is_superuser=True))

    response = client.post(
        reverse("admin:migrations_ops_target_change", args=[target.pk]),
        {
            "name": "shop",
            "environment": "production",
            "convention": "runbook",
            "connection_url": "",
            "schema": schema,
            "statement_timeout_seconds": "300",
            "requires_approval": "on",
        },
    )
    assert response.status_code == 200  # the form again, with the error
    assert "A schema name is letters, digits, _, $ and -" in response.text
    assert Target.objects.get(pk=target.pk).schema == target_db.schema
    assert snapshot(target_db) == before


@pytest.mark.django_db
def test_a_stored_schema_name_with_quotes_is_only_ever_an_identifier(shop):
    """A schema stored before names were checked (or written straight into the console's
    database) is quoted: the console finds no such schema and says so."""
    target_db, target = shop
    before = snapshot(target_db)
    for schema in [DROP_BOOKS, f'{target_db.schema}"; DELETE FROM migration_lock; --']:
        Target.objects.filter(pk=target.pk).update(schema=schema)
        status = services.read_target_status(Target.objects.get(pk=target.pk))
        assert status.error is not None
        assert "no migrations, migration_lock tables in schema" in status.error
        assert snapshot(target_db) == before


# --- the command line -----------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("version", ATTEMPTS)
def test_versions_from_the_command_line_are_only_ever_values(shop, version):
    target_db, _ = shop
    target_db.execute("DELETE FROM migration_lock")  # so that the version is looked at
    before = snapshot(target_db)

    with pytest.raises(CommandError, match="unknown version"):
        ops("mark-applied", "--target", "shop", "--version", version, "--reason", "x")
    with pytest.raises(CommandError, match="is not recorded as applied on shop"):
        ops("mark-rolled-back", "--target", "shop", "--version", version, "--reason", "x")
    with pytest.raises(CommandError, match=r"^version .* is not applied \(latest applied: "):
        ops("rollback", "--target", "shop", "--version", version, "--dry-run")
    with pytest.raises(CommandError, match=r"^unknown version "):
        ops("up", "--target", "shop", "--to", version, "--dry-run")

    assert snapshot(target_db) == before
    assert not Operation.objects.exists()


@pytest.mark.django_db
def test_names_and_schemas_from_the_command_line_are_refused(shop):
    target_db, _ = shop
    before = snapshot(target_db)
    with pytest.raises(CommandError, match="schema: A schema name is letters"):
        ops(
            "register",
            *("--name", "shop2", "--url", target_db.url, "--convention", "runbook"),
            *("--environment", "staging", "--schema", DROP_BOOKS),
        )
    for name in [DROP_BOOKS, DELETE_LOCK]:
        with pytest.raises(CommandError, match="unknown target"):
            ops("status", "--target", name)
    assert snapshot(target_db) == before
    assert list(Target.objects.values_list("name", flat=True)) == ["shop"]


# --- the API --------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_the_api_answers_injections_with_a_clear_error(client, shop):
    target_db, _ = shop
    before = snapshot(target_db)
    client.force_login(UserFactory(is_superuser=True))

    for name in [DROP_BOOKS, DELETE_LOCK]:
        response = client.get(reverse("migrations_ops_api:migrations-status"), {"target": name})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_target"

    unlock = reverse("migrations_ops_api:force-unlock", args=["shop"])
    response = client.post(
        unlock,
        {"reason": DELETE_LOCK, "confirm_name": DROP_BOOKS},
        content_type="application/json",
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "shop" in error["message"]

    response = client.post(
        unlock,
        {"reason": "stuck", "confirm_name": "shop", "incident": DELETE_LOCK},
        content_type="application/json",
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "incident must be an incident number, such as 12"
    )

    assert snapshot(target_db) == before
    assert not Operation.objects.exists()
