"""The audit trail's hash chain: every way of tampering with the table directly is named by
``ops audit-verify``; concurrent writers never fork the chain."""

import importlib
import threading

import pytest
from django.apps import apps
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection, connections, transaction

from migrations_ops import audit_chain, audit_witness, services
from migrations_ops.actors import Actor
from migrations_ops.models import AuditEvent
from tests.factories import UserFactory

TRIGGER = "migrations_ops_auditevent_append_only"


def record(action: str = "target.changed", **details) -> AuditEvent:
    return services.record_audit_event(Actor.shell_operator(), action, details=details)


def commit() -> None:
    """The test's transaction never commits: run what its commit would have by now (the
    audit witness's writes), as before an operator runs the command."""
    pending = list(connection.run_on_commit)
    connection.run_on_commit.clear()
    for _savepoints, callback, _robust in pending:
        callback()
    assert audit_witness.settle()  # the witness is written by a thread of its own


def witnessed_at() -> str:
    return audit_witness.read().written_at


def verify(*options: str) -> tuple[str, str]:
    """``ops audit-verify``: (stdout, stderr + the error line) as the operator sees them."""
    from io import StringIO

    commit()
    out, err = StringIO(), StringIO()
    try:
        call_command("ops", "audit-verify", *options, stdout=out, stderr=err)
    except CommandError as error:
        return out.getvalue(), err.getvalue() + f"{error}\n"
    return out.getvalue(), err.getvalue()


def tamper(sql: str, params=()) -> None:
    """What someone with the database's owner account could do: switch the append-only
    trigger off, change the table, switch it back on."""
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE migrations_ops_auditevent DISABLE TRIGGER {TRIGGER}")
        cursor.execute(sql, params)
        cursor.execute(f"ALTER TABLE migrations_ops_auditevent ENABLE TRIGGER {TRIGGER}")


@pytest.mark.django_db
def test_an_untouched_trail_verifies_and_its_last_hash_is_printed():
    events = [record(n=n) for n in range(3)]

    out, err = verify()

    assert err == ""
    assert out.splitlines()[0] == (
        f"audit chain intact: 3 events, last #{events[-1].pk} {events[-1].hash}"
    )
    assert events[0].previous_hash == ""
    assert events[1].previous_hash == events[0].hash
    assert events[2].previous_hash == events[1].hash


@pytest.mark.django_db
def test_the_database_still_refuses_changes_while_the_trigger_is_on():
    event = record()
    with pytest.raises(Exception, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).update(action="nothing happened")


@pytest.mark.django_db
def test_an_altered_row_is_named():
    _first, second, _third = (record(n=n) for n in range(3))
    tamper(
        "UPDATE migrations_ops_auditevent SET details = %s WHERE id = %s",
        ['{"n": 99}', second.pk],
    )

    out, err = verify()

    assert out == ""
    lines = err.splitlines()
    assert lines[0] == (
        f"audit event #{second.pk} was altered: its hash does not match its content"
    )
    assert lines[-1] == "audit chain broken: 1 problem(s) in 3 events named above"


@pytest.mark.django_db
def test_a_row_altered_and_rehashed_breaks_the_next_link():
    _first, second, third = (record(n=n) for n in range(3))
    second.action = "nothing happened"
    forged_hash = audit_chain.compute_hash(second.previous_hash, audit_chain.content_of(second))
    tamper(
        "UPDATE migrations_ops_auditevent SET action = %s, hash = %s WHERE id = %s",
        ["nothing happened", forged_hash, second.pk],
    )

    _, err = verify()

    assert err.splitlines()[0] == (
        f"audit events were removed between #{second.pk} and #{third.pk} (or #{second.pk} was "
        f"rewritten with a new hash): #{third.pk} does not link to #{second.pk}"
    )


@pytest.mark.django_db
def test_a_chain_rewritten_without_the_key_is_named_at_the_altered_row(settings):
    """Whoever can write to the database but does not hold AUDIT_CHAIN_KEY alters a row and
    recomputes every hash from there on, each link consistent: the first one is named."""
    first, second, third = (record(n=n) for n in range(3))
    second.action = "nothing happened"
    real_key, settings.AUDIT_CHAIN_KEY = settings.AUDIT_CHAIN_KEY, "a guess at the key"
    previous = first.hash
    for event in (second, third):
        previous = audit_chain.seal(event, previous)
    settings.AUDIT_CHAIN_KEY = real_key
    for event in (second, third):
        tamper(
            "UPDATE migrations_ops_auditevent SET action = %s, previous_hash = %s, hash = %s "
            "WHERE id = %s",
            [event.action, event.previous_hash, event.hash, event.pk],
        )

    _, err = verify()

    assert err.splitlines()[0] == (
        f"audit event #{second.pk} was altered: its hash does not match its content"
    )
    assert f"audit event #{third.pk} was altered" in err


@pytest.mark.django_db
def test_a_removed_row_is_named_by_its_neighbours():
    first, second, third, _fourth = (record(n=n) for n in range(4))
    tamper("DELETE FROM migrations_ops_auditevent WHERE id = %s", [second.pk])

    _, err = verify()

    assert err.splitlines()[0] == (
        f"audit events were removed between #{first.pk} and #{third.pk} (or #{first.pk} was "
        f"rewritten with a new hash): #{third.pk} does not link to #{first.pk}"
    )
    assert "1 problem(s) in 3 events" in err


@pytest.mark.django_db
def test_removing_the_first_rows_is_named():
    first, second = record(), record()
    tamper("DELETE FROM migrations_ops_auditevent WHERE id = %s", [first.pk])

    _, err = verify()

    assert err.splitlines()[0] == (
        f"audit events were removed before #{second.pk}, the first: it links to an event that "
        "is not there"
    )


@pytest.mark.django_db
def test_a_row_slipped_in_is_named_even_with_a_well_forged_hash():
    first = record(n=1)
    with pytest.raises(RuntimeError), transaction.atomic():  # leaves a gap in the ids
        record(n=2)
        raise RuntimeError
    third = record(n=3)
    gap = first.pk + 1
    assert third.pk == gap + 1
    forged = AuditEvent(id=gap, actor_name="nobody", door="cli", action="operation.approved")
    audit_chain.seal(forged, first.hash)
    forged.save()

    _, err = verify()

    assert err.splitlines()[0] == (
        f"audit event #{gap} was inserted: #{third.pk} links to #{first.pk}, the event before it"
    )


@pytest.mark.django_db
def test_gaps_left_by_rolled_back_events_are_no_problem():
    record()
    with pytest.raises(RuntimeError), transaction.atomic():
        record()
        raise RuntimeError
    record()

    out, err = verify()

    assert err == ""
    assert out.startswith("audit chain intact: 2 events")


@pytest.mark.django_db
def test_values_come_back_from_the_database_as_they_were_hashed():
    """JSON numbers, unicode, IPv6 addresses: the hash of the row as read equals the hash
    computed before the insert."""
    from opsconsole import middleware

    with middleware.bound(request_id="req-1", ip="2001:DB8:0:0::1"):
        event = record(big=1e20, small=1e-7, ratio=0.1, name="Zoë ☃", nested={"b": [1, 2.0]})
    stored = AuditEvent.objects.get(pk=event.pk)

    assert stored.ip == "2001:db8::1"
    assert audit_chain.compute_hash(stored.previous_hash, audit_chain.content_of(stored)) == (
        stored.hash
    )
    assert verify()[1] == ""


@pytest.mark.django_db
def test_many_events_at_once_are_chained_in_order():
    record(n=0)
    services.record_audit_events(
        [
            AuditEvent(actor_name="bench", door="task", action="operation.succeeded")
            for _ in range(50)
        ]
    )
    record(n=51)

    out, err = verify()

    assert err == ""
    assert out.startswith("audit chain intact: 52 events")


@pytest.mark.django_db
def test_a_user_without_the_view_permission_cannot_verify():
    UserFactory(username="stranger")
    with pytest.raises(CommandError, match="stranger is not allowed to view the audit trail"):
        call_command("ops", "--as", "stranger", "audit-verify")


@pytest.mark.django_db
def test_the_migration_chains_the_events_written_before_the_chain():
    AuditEvent.objects.bulk_create(
        [AuditEvent(actor_name="old", door="admin", action=f"old.{n}") for n in range(5)]
    )
    assert "problem(s) in 5 events" in verify()[1]
    migration = importlib.import_module("migrations_ops.migrations.0011_audit_chain")

    with connection.schema_editor() as editor:
        migration.chain_existing_events(apps, editor)

    # Upgraded: the chain verifies, but no witness has seen it yet.
    _, err = verify()
    assert err.splitlines()[0].startswith("no audit witness at ")
    out, err = verify("--start-witness")
    last = AuditEvent.objects.order_by("-id").first()
    assert err == ""
    assert out.splitlines()[:3] == [
        f"audit witness started at #{last.pk}",
        f"audit chain intact: 5 events, last #{last.pk} {last.hash}",
        f"it passes through #{last.pk}, witnessed {witnessed_at()} in "
        f"{settings.AUDIT_WITNESS_PATH}",
    ]


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_keep_one_chain():
    """Writers in several threads, each its own connection and transactions that stay open a
    little after their event: the chain lock makes every one wait for the one before to
    commit, so none links to an event another may still roll back, and none forks."""
    writers, per_writer = 4, 10
    errors = []
    start = threading.Barrier(writers)

    def write(number: int) -> None:
        try:
            start.wait()
            for n in range(per_writer):
                with transaction.atomic():
                    record(writer=number, n=n)
                    connection.cursor().execute("SELECT pg_sleep(0.002)")
        except Exception as error:  # reported below
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    out, err = verify()
    assert err == ""
    assert out.startswith(f"audit chain intact: {writers * per_writer} events")
    hashes = list(AuditEvent.objects.order_by("id").values_list("previous_hash", flat=True))
    assert len(set(hashes)) == len(hashes)  # no two events link to the same one
