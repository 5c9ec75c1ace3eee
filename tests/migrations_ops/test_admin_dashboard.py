"""The admin index as the on-call engineer's fleet view: every target's health, worst first."""

import datetime as dt
import html
import re
import time

import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from migrations_ops import roles
from migrations_ops.models import LockObservation, MigrationScript, Operation, Target
from tests.factories import ON_CALL_PERMISSIONS, IncidentFactory, TargetFactory, UserFactory
from tests.migrations_ops.test_admin import body, cell, text

pytestmark = pytest.mark.django_db

INDEX = "admin:index"
SECRET_URL = "postgresql://ops:SECRETMARKER@db.internal:5432/orders"


@pytest.fixture(autouse=True)
def no_target_connections(monkeypatch):
    """The fleet view reads what the console stored: any connection to a target fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the admin index opened a connection to a target")

    monkeypatch.setattr("migrations_ops.engine.connection._connect_postgresql", refuse)
    monkeypatch.setattr("migrations_ops.engine.connection._connect_sqlite", refuse)


@pytest.fixture
def oncall(client):
    client.force_login(UserFactory(username="oncall-engineer", permissions=ON_CALL_PERMISSIONS))
    return client


def observe(target, *, held=False, age=None, holder="", error="", seen_ago=dt.timedelta(0)):
    """What the console last read of the target's lock (a failed read when ``error``)."""
    now = timezone.now()
    return LockObservation.objects.create(
        target=target,
        held=None if error else held,
        holder=holder,
        locked_at=now - age if age is not None else None,
        observed_at=now - seen_ago,
        error=error,
    )


def operation(target, kind="apply", status="succeeded", *, ago=dt.timedelta(hours=1), **fields):
    requested_at = timezone.now() - ago
    fields.setdefault("params", {"dry_run": False} if kind in ("apply", "rollback") else {})
    return Operation.objects.create(
        target=target,
        kind=kind,
        status=status,
        requested_by_name="oncall-engineer",
        door="admin",
        reason="test",
        requested_at=requested_at,
        started_at=requested_at,
        finished_at=requested_at + dt.timedelta(seconds=2),
        **fields,
    )


def fleet_rows(response) -> list[tuple[str, str, str]]:
    """(target name, state, row markup) for each fleet row, in page order."""
    found = re.findall(
        r'(<tr class="fleet-row fleet-(\w+)" data-target="([^"]+)".*?</tr>)',
        body(response),
        flags=re.DOTALL,
    )
    return [(name, state, row) for row, state, name in found]


def fleet_row(response, name: str) -> tuple[str, str]:
    """(state, what the row says) for one target."""
    found = [
        (state, text(row)) for row_name, state, row in fleet_rows(response) if row_name == name
    ]
    assert len(found) == 1, f"no single fleet row for {name}"
    return found[0]


def test_a_stale_lock_comes_first_in_red_with_its_holder_and_age(oncall):
    healthy = TargetFactory(name="aaa-billing", environment="production")
    observe(healthy, held=False, seen_ago=dt.timedelta(minutes=3))
    operation(healthy, "apply", "succeeded")
    operation(healthy, "verify", "succeeded", result={"applied": 7, "problems": []})
    stale = TargetFactory(name="zzz-orders", environment="staging")
    observe(
        stale,
        held=True,
        age=dt.timedelta(minutes=20),
        holder="deploy-7f3a (pid 4121)",
        seen_ago=dt.timedelta(minutes=9),
    )
    observations = list(LockObservation.objects.values())

    response = oncall.get(reverse(INDEX))

    assert response.status_code == 200
    assert [row[0] for row in fleet_rows(response)] == ["zzz-orders", "aaa-billing"]
    state, row = fleet_row(response, "zzz-orders")
    assert state == "critical"
    assert "stale: held 20 min by deploy-7f3a (pid 4121)" in row
    assert "lock held 20 min (over 30 s)" in row
    assert "Staging" in row
    state, row = fleet_row(response, "aaa-billing")
    assert state == "ok"
    assert re.search(r"free .* 7 0 .* 0 #\d+ Verify ?: succeeded", row), row
    page = body(response)
    assert "#fleet tr.fleet-critical .fleet-state { background: #c62828; }" in page
    assert "#fleet tr.fleet-ok .fleet-state { background: #2e7d32; }" in page
    assert reverse("admin:migrations_ops_target_change", args=[stale.pk]) in page
    # The oldest observation is said, and the way to read the locks again.
    assert "The oldest observation is 9" in text(page)
    assert f'href="{reverse("admin:migrations_ops_target_changelist")}"' in page
    assert "Refresh lock status" in page
    # The thresholds the page applied are on it, and the standard app list is still below.
    assert "over 30 s" in text(page) and "over 10 %" in text(page) and "over 50 %" in text(page)
    assert page.index('id="fleet"') < page.index('class="app-migrations_ops')
    assert list(LockObservation.objects.values()) == observations


def test_a_failure_rate_over_ten_percent_is_critical(oncall):
    failing = TargetFactory(name="failing")
    observe(failing)
    for _ in range(3):
        operation(failing, "apply", "failed", error="relation already exists")
    operation(failing, "rollback", "lost")
    for _ in range(2):
        operation(failing, "apply", "succeeded")
    # At the threshold, not over it; and failures that are old or only rehearsals do not count.
    borderline = TargetFactory(name="borderline")
    observe(borderline)
    operation(borderline, "apply", "failed")
    for _ in range(9):
        operation(borderline, "apply", "succeeded")
    for _ in range(5):
        operation(borderline, "apply", "failed", ago=dt.timedelta(hours=25))
        operation(borderline, "rollback", "failed", params={"dry_run": True})

    response = oncall.get(reverse(INDEX))

    state, row = fleet_row(response, "failing")
    assert state == "critical"
    assert "4 of 6 migrations failed in 24 h (66.7 %, over 10 %)" in row
    failed_link = (
        f"{reverse('admin:migrations_ops_operation_changelist')}"
        f"?requested=24h&amp;status__exact=failed&amp;target__id__exact={failing.pk}"
    )
    assert f'href="{failed_link}">3</a>' in body(response)
    assert fleet_row(response, "borderline")[0] == "ok"


def test_a_retry_rate_over_half_is_a_warning(oncall):
    retrying = TargetFactory(name="retrying")
    observe(retrying)
    operation(retrying, "apply", "succeeded", result={"lock_attempts": 3})
    operation(retrying, "rollback", "succeeded", result={"lock_attempts": 2})
    operation(retrying, "apply", "succeeded", result={"lock_attempts": 1})
    half = TargetFactory(name="half")
    observe(half)
    operation(half, "apply", "succeeded", result={"lock_attempts": 2})
    operation(half, "apply", "succeeded", result={"lock_attempts": 1})

    response = oncall.get(reverse(INDEX))

    state, row = fleet_row(response, "retrying")
    assert state == "warning"
    assert "2 of 3 migrations retried for the lock in 24 h (66.7 %, over 50 %)" in row
    assert fleet_row(response, "half")[0] == "ok"
    assert "#fleet tr.fleet-warning .fleet-state { background: #b26a00; }" in body(response)


def test_an_unreadable_target_is_a_warning_and_never_shows_its_password(oncall):
    target = TargetFactory(name="legacy-prod", connection_url=SECRET_URL)
    observe(target, error="connection refused by db.internal:5432")
    TargetFactory(name="never-read", connection_url=SECRET_URL.replace("orders", "b"))

    response = oncall.get(reverse(INDEX))

    state, row = fleet_row(response, "legacy-prod")
    assert state == "warning"
    assert "lock state unknown: connection refused by db.internal:5432" in row
    assert fleet_row(response, "never-read")[0] == "warning"
    assert "Never read: never-read." in text(body(response))
    assert "SECRETMARKER" not in body(response)


def test_applied_and_pending_come_from_the_last_successful_verify(oncall):
    target = TargetFactory(name="orders")
    observe(target)
    problems = [
        {"code": "pending", "message": "003_a.sql is pending"},
        {"code": "pending", "message": "004_b.sql is pending"},
        {"code": "changed", "message": "002_c.sql changed since it was applied"},
    ]
    operation(target, "verify", "succeeded", result={"applied": 2, "problems": problems})
    operation(target, "verify", "failed", ago=dt.timedelta(minutes=5), result={"applied": 99})
    MigrationScript.objects.bulk_create(
        MigrationScript(
            target=target,
            version=f"00{n}",
            name=f"m{n}",
            filename=f"00{n}_m{n}.sql",
            layout="dbmate",
            up_sql="SELECT 1;",
            checksum="0" * 64,
        )
        for n in range(1, 5)
    )

    response = oncall.get(reverse(INDEX))

    _, row = fleet_row(response, "orders")
    assert re.search(r"Staging free .* 4 2 2 verified .* ago 1 #\d+ Verify ?: failed", row), row


def test_the_number_of_queries_does_not_grow_with_the_targets(oncall):
    def build(count: int) -> None:
        targets = Target.objects.bulk_create(
            Target(
                name=f"fleet-{Target.objects.count() + n:03}",
                environment="staging",
                connection_url="sqlite:////nonexistent.sqlite3",
                convention="runbook",
            )
            for n in range(count)
        )
        now = timezone.now()
        LockObservation.objects.bulk_create(
            LockObservation(
                target=t,
                held=bool(n % 2),
                holder="deploy",
                locked_at=now - dt.timedelta(minutes=n),
                observed_at=now,
            )
            for n, t in enumerate(targets)
        )
        MigrationScript.objects.bulk_create(
            MigrationScript(
                target=t,
                version="001",
                name="init",
                filename="001_init.sql",
                layout="dbmate",
                up_sql="SELECT 1;",
                checksum="0" * 64,
            )
            for t in targets
        )
        for t in targets:
            operation(t, "verify", "succeeded", result={"applied": 1, "problems": []})
            operation(t, "apply", "failed", ago=dt.timedelta(minutes=1))
        IncidentFactory().affected_targets.add(*targets)

    def queries() -> list[str]:
        with CaptureQueriesContext(connection) as captured:
            response = oncall.get(reverse(INDEX))
        assert response.status_code == 200
        return [query["sql"] for query in captured.captured_queries]

    build(2)
    two = queries()
    assert len(fleet_rows(oncall.get(reverse(INDEX)))) == 2
    build(18)
    twenty = queries()
    assert len(fleet_rows(oncall.get(reverse(INDEX)))) == 20
    assert len(twenty) == len(two), "\n".join(twenty)


def test_open_incidents_are_counted_per_target_and_lead_to_them(oncall):
    orders = TargetFactory(name="orders")
    billing = TargetFactory(name="billing")
    IncidentFactory(title="billing slow").affected_targets.add(billing)
    for title, status in [
        ("orders lock stuck", "detected"),
        ("orders slow", "monitoring"),
        ("orders rollback", "resolved"),
        ("orders last month", "closed"),
    ]:
        IncidentFactory(title=title, status=status).affected_targets.add(orders)

    # An engineer who may not view incidents sees the count alone.
    page = oncall.get(reverse(INDEX))
    assert cell(fleet_markup(page, "orders"), "fleet-incidents") == "2"
    assert cell(fleet_markup(page, "billing"), "fleet-incidents") == "1"

    commander = UserFactory(username="commander")
    commander.groups.add(Group.objects.get(name=roles.INCIDENT_COMMANDER))
    oncall.force_login(commander)
    page = oncall.get(reverse(INDEX))
    orders_cell = cell(fleet_markup(page, "orders"), "fleet-incidents")
    link = re.fullmatch(r'<a href="([^"]+)">2</a>', orders_cell)
    assert link, orders_cell
    listed = text(body(oncall.get(html.unescape(link.group(1)))))
    assert "orders lock stuck" in listed and "orders slow" in listed
    assert "orders rollback" not in listed and "orders last month" not in listed
    assert "billing slow" not in listed


def fleet_markup(response, name: str) -> str:
    [row] = [row for row_name, _, row in fleet_rows(response) if row_name == name]
    return row


def test_the_table_is_for_users_who_may_view_targets(client):
    TargetFactory(name="orders-prod")
    client.force_login(
        UserFactory(username="history", permissions=["migrations_ops.view_operation"])
    )

    response = client.get(reverse(INDEX))

    assert response.status_code == 200
    assert 'id="fleet"' not in body(response)
    assert "orders-prod" not in body(response)
    assert "Operations" in text(body(response))  # the app list is still there


def test_an_auditor_sees_the_table(client):
    TargetFactory(name="orders-prod")
    auditor = UserFactory(username="auditor")
    auditor.groups.add(Group.objects.get(name=roles.AUDITOR))
    client.force_login(auditor)

    response = client.get(reverse(INDEX))

    state, row = fleet_row(response, "orders-prod")
    assert state == "warning"
    assert "lock state unknown: never read" in row


def test_a_console_admin_edits_the_thresholds_and_the_view_applies_them(client, oncall):
    """Edited in the admin (audited), applied at once; an on-call engineer may not edit them."""
    from django.apps import apps

    from migrations_ops.models import AlertThresholds, AuditEvent

    roles.sync_roles(apps)
    held = TargetFactory(name="orders")
    observe(held, held=True, age=dt.timedelta(seconds=45), seen_ago=dt.timedelta(seconds=5))
    assert fleet_row(oncall.get(reverse(INDEX)), "orders")[0] == "critical"  # over 30 s

    add_url = reverse("admin:migrations_ops_alertthresholds_add")
    assert oncall.get(add_url).status_code == 403
    admin_user = UserFactory(username="console-admin")
    admin_user.groups.add(Group.objects.get(name=roles.CONSOLE_ADMIN))
    client.force_login(admin_user)
    response = client.post(
        add_url, {"lock_held_seconds": "600", "failure_rate": "0.2", "retry_rate": "0.5"}
    )
    assert response.status_code == 302
    assert AlertThresholds.objects.get().lock_held_seconds == 600
    event = AuditEvent.objects.get(action="thresholds.changed")
    assert event.actor_name == "console-admin" and event.details["lock_held_seconds"] == 600
    assert client.get(add_url).status_code == 403  # one row only: it is changed, not added

    state, row = fleet_row(oncall.get(reverse(INDEX)), "orders")
    assert state == "ok", row
    assert "over 600 s" in text(body(oncall.get(reverse(INDEX))))


# --- the workers ---------------------------------------------------------------------------------
def workers_note(response) -> tuple[str, str]:
    """(state, text) of the line saying whether a worker is alive."""
    (found,) = re.findall(
        r'<p id="fleet-workers"[^>]*data-state="(\w+)">(.*?)</p>', body(response), re.S
    )
    return found[0], text(found[1])


def test_with_tasks_run_in_process_no_worker_is_missed(oncall):
    state, note = workers_note(oncall.get(reverse(INDEX)))
    assert state == "ok"
    assert "no worker is needed" in note


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_no_worker_alive_is_said_in_red_until_a_worker_starts(oncall, own_queue, start_worker):
    TargetFactory(name="orders")
    response = oncall.get(reverse(INDEX))

    state, note = workers_note(response)
    assert state == "critical"
    assert 'class="errornote"' in body(response)
    assert note.startswith(f"No worker alive: no worker of queue '{own_queue}' has ever been seen")
    assert "nothing runs them" in note

    start_worker()
    deadline = time.monotonic() + 20
    while (found := workers_note(oncall.get(reverse(INDEX))))[0] != "ok":
        assert time.monotonic() < deadline, "the worker never showed as alive"
        time.sleep(0.2)

    state, note = found
    assert note.startswith(f"Workers: 1 worker(s) of queue '{own_queue}' alive: test-{own_queue}@")
    assert "last heard" in note
