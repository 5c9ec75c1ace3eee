"""The chain's head kept outside the database: ``ops audit-verify`` names events removed from the
end of the trail, or all of them, by someone writing to the database with the append-only
triggers off; the witness cannot be forged, and never moves backwards or past a cut."""

import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from migrations_ops import audit_witness
from migrations_ops.models import AuditEvent
from tests.migrations_ops.test_audit_chain import commit, record, verify
from tests.worker import database_url

ROOT = Path(__file__).resolve().parents[2]


def as_superuser_with_triggers_off(sql: str, params=(), *, how: str = "replica") -> None:
    """What a database superuser could do: switch every trigger off, then write."""
    with connection.cursor() as cursor:
        if how == "replica":
            cursor.execute("SET session_replication_role = replica")
            cursor.execute(sql, params)
            cursor.execute("SET session_replication_role = DEFAULT")
        else:
            cursor.execute("ALTER TABLE migrations_ops_auditevent DISABLE TRIGGER ALL")
            cursor.execute(sql, params)
            cursor.execute("ALTER TABLE migrations_ops_auditevent ENABLE TRIGGER ALL")


def witnessed() -> audit_witness.Witnessed:
    return audit_witness.read()


@pytest.mark.django_db
@pytest.mark.parametrize("how", ["replica", "disable trigger all"])
def test_the_newest_events_removed_are_named(how):
    first, second, third = (record(n=n) for n in range(3))
    commit()
    assert witnessed().last_id == third.pk
    as_superuser_with_triggers_off(
        "DELETE FROM migrations_ops_auditevent WHERE id >= %s", [second.pk], how=how
    )

    out, err = verify()

    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith(
        f"the newest audit events were removed: the trail ends at #{first.pk}, but event "
        f"#{third.pk} was written (witnessed "
    )
    assert lines[-1] == "audit chain broken: 1 problem(s) in 1 event named above"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "emptying",
    ["DELETE FROM migrations_ops_auditevent", "TRUNCATE migrations_ops_auditevent"],
)
def test_an_emptied_trail_is_named(emptying):
    last = [record(n=n) for n in range(3)][-1]
    commit()
    as_superuser_with_triggers_off(emptying)

    _, err = verify()

    assert err.splitlines()[0].startswith(
        f"the audit trail was emptied: it is empty, but event #{last.pk} was written (witnessed "
    )
    assert err.splitlines()[-1] == "audit chain broken: 1 problem(s) in 0 events named above"


@pytest.mark.django_db
def test_a_cut_end_stays_named_after_new_events_are_appended():
    """New events link to the last one left, so the chain itself looks whole again: the
    witness does not move past the removed event."""
    _first, second = record(n=1), record(n=2)
    commit()
    as_superuser_with_triggers_off(
        "DELETE FROM migrations_ops_auditevent WHERE id = %s", [second.pk]
    )
    later = record(n=3)

    _, err = verify()

    assert witnessed().last_id == second.pk
    assert later.pk > second.pk
    assert err.splitlines()[0].startswith(f"audit event #{second.pk} was removed (witnessed ")


@pytest.mark.django_db
def test_a_witness_edited_by_hand_is_named():
    first, second = record(n=1), record(n=2)
    commit()
    path = Path(settings.AUDIT_WITNESS_PATH)
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "last_id": first.pk, "hash": first.hash}))

    _, err = verify()

    assert err.splitlines()[0] == (
        f"the audit witness {path} was altered: its signature does not match its content"
    )
    assert second.pk  # the chain itself is intact: only the witness speaks


@pytest.mark.django_db
def test_an_untouched_trail_with_its_witness_is_intact():
    events = [record(n=n) for n in range(2)]

    out, err = verify()

    assert err == ""
    assert out.splitlines() == [
        f"audit chain intact: 2 events, last #{events[-1].pk} {events[-1].hash}",
        f"it passes through #{events[-1].pk}, witnessed {witnessed().written_at} in "
        f"{settings.AUDIT_WITNESS_PATH}",
    ]
    assert witnessed().last_id == events[-1].pk


@pytest.mark.django_db
def test_the_witness_never_moves_backwards():
    older, newer = record(n=1), record(n=2)
    audit_witness.advance(AuditEvent, last_id=newer.pk, last_hash=newer.hash, linked_to=older.hash)
    # The older event's commit callback, run late by a slower process.
    audit_witness.advance(AuditEvent, last_id=older.pk, last_hash=older.hash, linked_to="")

    assert witnessed().last_id == newer.pk


def _cli_env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "opsconsole.settings",
        "DATABASE_URL": database_url(settings.DATABASES["default"]),
        "AUDIT_CHAIN_KEY": settings.AUDIT_CHAIN_KEY,
        "AUDIT_WITNESS_PATH": str(settings.AUDIT_WITNESS_PATH),
        "REDIS_URL": "",
    }


def _manage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


APPEND = """
from migrations_ops import services
from migrations_ops.actors import Actor
for n in range({count}):
    services.record_audit_event(Actor.shell_operator(), "target.changed", details={{"n": n}})
"""


@pytest.mark.django_db(transaction=True)
def test_two_processes_appending_at_once_leave_the_witness_at_the_end_and_the_cli_exits_1():
    writers = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "shell", "-c", APPEND.format(count=40)],
            env=_cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for writer in writers:
        _, errors = writer.communicate(timeout=180)
        assert writer.returncode == 0, errors

    last = AuditEvent.objects.order_by("-id").first()
    assert AuditEvent.objects.count() == 80
    assert witnessed().last_id == last.pk
    intact = _manage("ops", "audit-verify")
    assert (intact.returncode, intact.stderr) == (0, "")
    assert intact.stdout.startswith("audit chain intact: 80 events")

    as_superuser_with_triggers_off("DELETE FROM migrations_ops_auditevent WHERE id = %s", [last.pk])
    cut = _manage("ops", "audit-verify")

    assert cut.returncode == 1
    assert cut.stdout == ""
    assert "the newest audit events were removed" in cut.stderr
    assert "audit chain broken: 1 problem(s) in 79 events named above" in cut.stderr


@pytest.mark.django_db(transaction=True)
def test_an_append_does_not_wait_for_the_witness_and_is_witnessed_once_written():
    """The witness is written by a thread of its own: a commit returns while another process
    holds the witness file's lock, and the witness reaches the event once the lock is free."""
    record(n=0)
    path = Path(settings.AUDIT_WITNESS_PATH)
    appended = []

    def append_five():
        appended.extend(record(n=n) for n in range(1, 6))  # each its own commit
        connection.close()

    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as another process writing the witness would
        appending = threading.Thread(target=append_five)
        appending.start()
        appending.join(timeout=10)
        waited = appending.is_alive()
        assert not audit_witness.settle(timeout=0.5)  # the witness still waits for the lock
        fcntl.flock(lock, fcntl.LOCK_UN)
    appending.join()

    assert not waited, "the appends waited for the witness file's lock"

    assert audit_witness.settle(timeout=10)
    assert witnessed().last_id == appended[-1].pk
    assert verify()[1] == ""
