"""Plain-SQL reads give what the ORM gives: the same values, converted the same way."""

import pytest

from migrations_ops import plain_rows, services
from migrations_ops.actors import Actor
from migrations_ops.models import MigrationScript, Operation, Target
from tests.factories import TargetFactory
from tests.scripts_folder import EMAIL, USERS, write_folder

pytestmark = pytest.mark.django_db


@pytest.fixture
def target(pg_target, tmp_path):
    pg_target.create_runbook_books()
    target = TargetFactory(db=pg_target, name="orders")
    services.import_scripts(
        actor=Actor.shell_operator(),
        target=target,
        directory=write_folder(tmp_path / "m", USERS, EMAIL),
    )
    return target


def test_select_converts_each_field_as_the_orm_does(target):
    fields = ("version", "up_statements", "transactional", "imported_at", "needs_no_transaction")
    version = plain_rows.quoted(MigrationScript, "version")

    rows = plain_rows.select(
        MigrationScript,
        fields,
        f"{plain_rows.quoted(MigrationScript, 'target')} = %s ORDER BY {version}",
        [target.pk],
    )

    expected = list(
        MigrationScript.objects.filter(target=target).order_by("version").values_list(*fields)
    )
    assert rows == expected
    assert isinstance(rows[0][1], list) and rows[0][1][0]["sql"].startswith("CREATE TABLE")


def test_instances_are_the_models_rows_with_secrets_decrypted(target):
    (loaded,) = plain_rows.instances(Target, f"{plain_rows.quoted(Target, 'id')} = %s", [target.pk])

    stored = Target.objects.get(pk=target.pk)
    assert loaded.connection_url == stored.connection_url == target.connection_url
    assert all(
        getattr(loaded, field.attname) == getattr(stored, field.attname)
        for field in Target._meta.concrete_fields
    )
    assert loaded._state.adding is False  # saved as an update, like any row from the database


def test_claim_returns_the_operation_as_stored_with_its_target(target):
    requested = services.request_verify(actor=Actor.shell_operator(), target=target)

    claimed = services._claim(requested.pk, "worker-1")

    stored = Operation.objects.get(pk=requested.pk)
    assert (
        (claimed.status, claimed.worker)
        == ("running", "worker-1")
        == (stored.status, stored.worker)
    )
    assert claimed.params == stored.params and claimed.requested_at == stored.requested_at
    assert claimed.target.name == "orders"
    assert services._claim(requested.pk, "worker-2") is None  # claimed once only


def test_insert_and_update_write_what_the_orm_reads_back(target):
    operation = Operation(
        kind="verify",
        target=target,
        requested_by_name="ops",
        door="cli",
        reason="check",
        params={"dry_run": False, "versions": ["001"]},
    )

    plain_rows.insert(operation)
    plain_rows.update(
        Operation,
        {"status": "failed", "result": {"ok": False}, "error": "boom"},
        f"{plain_rows.quoted(Operation, 'id')} = %s",
        [operation.pk],
    )

    stored = Operation.objects.get(pk=operation.pk)
    assert operation._state.adding is False and operation.pk == stored.pk
    assert (stored.status, stored.result, stored.error) == ("failed", {"ok": False}, "boom")
    assert stored.params == {"dry_run": False, "versions": ["001"]}
    assert stored.requested_at == operation.requested_at
    assert (stored.reason, stored.target_id) == ("check", target.pk)
