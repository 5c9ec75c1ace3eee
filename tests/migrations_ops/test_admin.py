"""The admin as an on-call engineer uses it: see the locks, release a stuck one, read history."""

import datetime as dt
import html
import re

import pytest
from django.urls import reverse
from django.utils import timezone

from migrations_ops import roles, services
from migrations_ops.models import (
    AuditEvent,
    Environment,
    LockObservation,
    Operation,
    OperationStatus,
)
from tests.factories import (
    ON_CALL_PERMISSIONS,
    IncidentFactory,
    TargetFactory,
    UserFactory,
    member,
)
from tests.targets import new_sqlite_target

pytestmark = pytest.mark.django_db

STALE = dt.timedelta(minutes=20)
UNREACHABLE_URL = "postgresql://u:SECRETMARKER@127.0.0.1:1/x"
CHANGELIST = "admin:migrations_ops_target_changelist"


# --- helpers ---------------------------------------------------------------------------------
@pytest.fixture
def engineer():
    return UserFactory(username="oncall-engineer", permissions=ON_CALL_PERMISSIONS)


@pytest.fixture
def oncall(client, engineer):
    client.force_login(engineer)
    return client


@pytest.fixture
def superuser_client(client):
    client.force_login(UserFactory(username="root", is_superuser=True))
    return client


def confirm_url(target) -> str:
    return reverse("admin:migrations_ops_target_force_unlock", args=[target.pk])


def operation_url(operation) -> str:
    return reverse("admin:migrations_ops_operation_change", args=[operation.pk])


def body(response) -> str:
    return response.content.decode()


def text(markup: str) -> str:
    """What a reader sees: tags dropped, entities decoded, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", markup))).strip()


def changelist_row(response, name: str) -> str:
    rows = re.findall(r"<tr[^>]*>.*?</tr>", body(response), flags=re.DOTALL)
    matching = [row for row in rows if f">{name}</a>" in row]
    assert len(matching) == 1, f"no single changelist row for {name}"
    return matching[0]


def cell(markup: str, css_class: str) -> str:
    pattern = rf'<t[dh][^>]*class="[^"]*{css_class}[^"]*"[^>]*>(.*?)</t[dh]>'
    found = re.search(pattern, markup, re.DOTALL)
    assert found, f"no {css_class} cell"
    return found.group(1)


def release(client, target, capture, **data):
    """POST the confirmation form and run what it commits (the task runs eagerly)."""
    with capture(execute=True):
        return client.post(confirm_url(target), data)


# --- target changelist -----------------------------------------------------------------------
def test_changelist_shows_the_last_observed_lock_of_each_target_without_connecting(
    oncall, pg_target, tmp_path
):
    pg_target.create_runbook_books(lock_age=STALE, locked_by="deploy-7f3a (pid 4121)")
    stale = TargetFactory(name="orders-staging", db=pg_target)
    free_db = new_sqlite_target(tmp_path)
    free_db.create_runbook_books()
    free = TargetFactory(name="billing-dev", db=free_db)
    held_db = new_sqlite_target(tmp_path)
    held_db.create_runbook_books(lock_age=dt.timedelta(seconds=5), locked_by="deploy-new")
    held = TargetFactory(name="search-staging", db=held_db)
    TargetFactory(name="legacy-prod", connection_url=UNREACHABLE_URL)
    for target in (stale, free, held):
        assert services.read_target_status(target).error is None
    observed_at = dict(LockObservation.objects.values_list("target__name", "observed_at"))
    # The stale lock goes away in the target: the list still shows what was last observed.
    pg_target.execute("DELETE FROM migration_lock")

    response = oncall.get(reverse(CHANGELIST))

    assert response.status_code == 200
    stale_row = text(changelist_row(response, "orders-staging"))
    assert "stale: held 20 min by deploy-7f3a (pid 4121)" in stale_row
    assert text(cell(changelist_row(response, "billing-dev"), "field-lock_column")) == "free"
    assert re.search(
        r"held: held \d+ s by deploy-new", text(changelist_row(response, "search-staging"))
    )
    unknown = changelist_row(response, "legacy-prod")
    assert text(cell(unknown, "field-lock_column")).startswith("unknown")
    assert text(cell(unknown, "field-observed_column")) == "never"
    # Nothing was read: no observation was made or refreshed, the unreachable one never tried.
    assert dict(LockObservation.objects.values_list("target__name", "observed_at")) == observed_at
    assert "SECRETMARKER" not in body(response)


def test_unreachable_target_lists_as_unknown_with_its_last_error(oncall):
    target = TargetFactory(name="legacy-prod", connection_url=UNREACHABLE_URL)
    services.read_target_status(target)  # what a refresh found: the target is unreachable

    response = oncall.get(reverse(CHANGELIST))

    assert response.status_code == 200
    lock = text(cell(changelist_row(response, "legacy-prod"), "field-lock_column"))
    assert lock.startswith("unknown: cannot connect to target")
    assert "SECRETMARKER" not in body(response)


# --- the action ------------------------------------------------------------------------------
def test_force_unlock_action_leads_to_the_confirmation_page(oncall):
    target = TargetFactory()
    changelist = oncall.get(reverse(CHANGELIST))
    assert 'value="force_unlock"' in body(changelist)

    response = oncall.post(
        reverse(CHANGELIST), {"action": "force_unlock", "_selected_action": [target.pk]}
    )

    assert response.status_code == 302
    assert response["Location"] == confirm_url(target)


def test_force_unlock_action_on_two_targets_is_an_error(oncall):
    first, second = TargetFactory(), TargetFactory()

    response = oncall.post(
        reverse(CHANGELIST),
        {"action": "force_unlock", "_selected_action": [first.pk, second.pk]},
        follow=True,
    )

    assert response.redirect_chain[-1][0] == reverse(CHANGELIST)
    assert "Select exactly one target to release its lock." in text(body(response))
    assert Operation.objects.count() == 0


# --- the confirmation page -------------------------------------------------------------------
def test_confirmation_page_shows_the_lock_as_it_is_now(oncall, pg_target):
    pg_target.create_runbook_books()
    target = TargetFactory(db=pg_target, lock_timeout_seconds=60)
    services.read_target_status(target)  # last seen free...
    pg_target.take_runbook_lock(lock_age=STALE, locked_by="deploy-7f3a (pid 4121)")  # ...now held
    locked_at = pg_target.query("SELECT locked_at FROM migration_lock")[0][0]

    response = oncall.get(confirm_url(target))

    assert response.status_code == 200
    page = text(body(response))
    assert "stale: held 20 min by deploy-7f3a (pid 4121)" in page
    assert "Holder deploy-7f3a (pid 4121)" in page
    since = locked_at.astimezone(dt.UTC).isoformat()
    assert f"Held since {since} UTC (as stored by the target)" in page
    assert "Lock timeout 60 s" in page
    assert 'value="Release the lock"' in body(response)


def test_confirmation_page_for_knex_says_the_time_is_when_first_seen_held(oncall, sqlite_target):
    sqlite_target.create_knex_books(locked=True)
    target = TargetFactory(db=sqlite_target, convention="knex")

    response = oncall.get(confirm_url(target))

    page = text(body(response))
    assert "Held since" in page
    assert "when the console first saw it held: the lock table keeps no time" in page
    assert "(first seen held; the table keeps no time)" in page
    assert "<th>Holder</th>" not in body(response)  # Knex keeps no holder


# --- releasing -------------------------------------------------------------------------------
def test_releasing_a_stale_lock(any_target, oncall, engineer, django_capture_on_commit_callbacks):
    any_target.create_runbook_books(lock_age=STALE, locked_by="deploy-42")
    target = TargetFactory(db=any_target)

    response = release(
        oncall, target, django_capture_on_commit_callbacks, reason="deploy-42 crashed mid-migration"
    )

    operation = Operation.objects.get(target=target)
    assert response.status_code == 302
    assert response["Location"] == operation_url(operation)
    assert any_target.runbook_lock_rows() == []
    assert operation.status == OperationStatus.SUCCEEDED
    assert operation.reason == "deploy-42 crashed mid-migration"
    assert operation.result["before"]["held"] is True
    assert operation.result["before"]["holder"] == "deploy-42"
    assert operation.result["after"]["held"] is False
    requested = AuditEvent.objects.get(operation=operation, action="operation.requested")
    assert (requested.door, requested.actor, requested.actor_name) == (
        "admin",
        engineer,
        "oncall-engineer",
    )
    assert AuditEvent.objects.filter(operation=operation, action="operation.succeeded").exists()

    page = text(body(oncall.get(response["Location"])))
    assert f"Operation #{operation.pk} requested: release the lock of {target.name}." in page
    assert "Succeeded" in page


@pytest.mark.parametrize("reason", ["", "   "])
def test_a_reason_is_required(oncall, pg_target, reason, django_capture_on_commit_callbacks):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target)

    response = release(oncall, target, django_capture_on_commit_callbacks, reason=reason)

    assert response.status_code == 200
    assert "This field is required." in text(body(response))
    assert Operation.objects.count() == 0
    assert len(pg_target.runbook_lock_rows()) == 1


def test_a_fresh_lock_is_refused_unless_release_fresh_is_ticked(
    oncall, pg_target, django_capture_on_commit_callbacks
):
    pg_target.create_runbook_books(lock_age=dt.timedelta(seconds=5))
    target = TargetFactory(db=pg_target, lock_timeout_seconds=60)

    refused = release(oncall, target, django_capture_on_commit_callbacks, reason="impatient")

    assert refused.status_code == 200
    page = text(body(refused))
    assert re.search(r"is not stale \(held for \d+ s; lock timeout 60 s\)", page)
    assert "tick 'release a fresh lock'" in page
    assert Operation.objects.count() == 0
    assert len(pg_target.runbook_lock_rows()) == 1

    released = release(
        oncall,
        target,
        django_capture_on_commit_callbacks,
        reason="holder pod was evicted",
        release_fresh="on",
    )

    operation = Operation.objects.get(target=target)
    assert released.status_code == 302
    assert operation.status == OperationStatus.SUCCEEDED
    assert operation.params["release_fresh"] is True
    assert pg_target.runbook_lock_rows() == []


def test_production_needs_its_name_typed(oncall, pg_target, django_capture_on_commit_callbacks):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target, name="orders-prod", environment=Environment.PRODUCTION)
    assert "Type the target&#x27;s name to confirm" in body(oncall.get(confirm_url(target)))

    missing = release(oncall, target, django_capture_on_commit_callbacks, reason="stuck")
    wrong = release(
        oncall,
        target,
        django_capture_on_commit_callbacks,
        reason="stuck",
        confirm_name="orders-staging",
    )

    assert missing.status_code == 200
    assert "This field is required." in text(body(missing))
    assert wrong.status_code == 200
    assert "orders-prod is a production target: type its name" in text(body(wrong))
    assert Operation.objects.count() == 0
    assert len(pg_target.runbook_lock_rows()) == 1

    right = release(
        oncall,
        target,
        django_capture_on_commit_callbacks,
        reason="stuck",
        confirm_name="orders-prod",
    )

    # On production an on-call engineer's request waits for a second person (two-person rule).
    assert right.status_code == 302
    assert Operation.objects.get(target=target).status == OperationStatus.AWAITING_APPROVAL
    assert len(pg_target.runbook_lock_rows()) == 1


def test_staff_without_the_force_unlock_permission_cannot_release(
    client, pg_target, django_capture_on_commit_callbacks
):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target)
    client.force_login(
        UserFactory(permissions=["migrations_ops.view_target", "migrations_ops.view_operation"])
    )

    assert client.get(confirm_url(target)).status_code == 403
    crafted = release(client, target, django_capture_on_commit_callbacks, reason="let me")
    assert crafted.status_code == 403
    changelist = client.get(reverse(CHANGELIST))
    assert changelist.status_code == 200
    assert changelist.status_code == 200  # a viewer sees the list, and no action at all
    assert 'value="refresh_status"' not in body(changelist)
    assert 'value="force_unlock"' not in body(changelist)
    action = client.post(
        reverse(CHANGELIST), {"action": "force_unlock", "_selected_action": [target.pk]}
    )
    # Not sent on to the confirmation page: the action does not exist for this user.
    assert action.get("Location") != confirm_url(target)

    assert Operation.objects.count() == 0
    assert len(pg_target.runbook_lock_rows()) == 1


def test_unreachable_target_shows_a_one_line_error_and_cannot_be_released(
    oncall, django_capture_on_commit_callbacks
):
    target = TargetFactory(connection_url=UNREACHABLE_URL)

    response = oncall.get(confirm_url(target))

    assert response.status_code == 200
    error = cell(body(response), "errornote")
    assert "cannot connect to target" in error
    assert "\n" not in error.strip()
    assert "SECRETMARKER" not in body(response)

    posted = release(oncall, target, django_capture_on_commit_callbacks, reason="stuck")

    assert posted.status_code == 200
    assert "cannot connect to target" in text(body(posted))
    assert "SECRETMARKER" not in body(posted)
    assert Operation.objects.count() == 0


# --- secrets ---------------------------------------------------------------------------------
def test_the_connection_password_never_appears_in_admin_pages(
    superuser_client, pg_target, django_capture_on_commit_callbacks
):
    marker = "PWMARKER7c1e"
    url = pg_target.url.replace("postgresql://postgres@", f"postgresql://postgres:{marker}@")
    client = superuser_client
    pages = {}

    pages["add form, refused"] = client.post(
        reverse("admin:migrations_ops_target_add"),
        {
            "name": "orders-new",
            "environment": "staging",
            "convention": "runbook",
            "connection_url": url,
            "schema": "",
            "statement_timeout_seconds": "0",
        },
    )
    assert pages["add form, refused"].status_code == 200  # re-shown with the error

    pg_target.create_runbook_books(lock_age=STALE, locked_by="deploy-42")
    target = TargetFactory(name="orders-staging", db=pg_target, connection_url=url)
    assert marker in target.connection_url

    pages["changelist"] = client.get(reverse(CHANGELIST))
    pages["refresh action"] = client.post(
        reverse(CHANGELIST),
        {"action": "refresh_status", "_selected_action": [target.pk]},
        follow=True,
    )
    change_url = reverse("admin:migrations_ops_target_change", args=[target.pk])
    pages["change form"] = client.get(change_url)
    pages["confirmation"] = client.get(confirm_url(target))
    with django_capture_on_commit_callbacks(execute=True):
        released = client.post(confirm_url(target), {"reason": "stuck"}, follow=True)
    pages["operation"] = released
    pages["edit target"] = client.post(
        change_url,
        {
            "name": "orders-staging",
            "environment": "staging",
            "convention": "runbook",
            "connection_url": "",
            "schema": pg_target.schema,
            "statement_timeout_seconds": "90",
        },
        follow=True,
    )
    pages["target history"] = client.get(
        reverse("admin:migrations_ops_target_history", args=[target.pk])
    )
    pages["operation list"] = client.get(reverse("admin:migrations_ops_operation_changelist"))
    pages["audit list"] = client.get(reverse("admin:migrations_ops_auditevent_changelist"))
    for event in AuditEvent.objects.all():
        pages[f"audit {event.action}"] = client.get(
            reverse("admin:migrations_ops_auditevent_change", args=[event.pk])
        )

    # The pages are the real ones: the release went through the marked URL, edits were saved.
    assert pg_target.runbook_lock_rows() == []
    assert "postgres:***@127.0.0.1:5432" in body(pages["change form"])
    assert "deploy-42" in body(pages["confirmation"])
    audit_pages = {"audit operation.requested", "audit operation.succeeded", "audit target.changed"}
    assert audit_pages <= set(pages)
    for page, response in pages.items():
        assert response.status_code == 200, page
        assert marker not in body(response), f"the password shows on the {page} page"


VIEW_ONLY = [roles.AUDITOR, roles.ON_CALL, roles.INCIDENT_COMMANDER, "view_target"]


def view_only_user(who: str):
    if who == "view_target":
        return UserFactory(username="viewer", permissions=["migrations_ops.view_target"])
    return member(who, username="viewer")


@pytest.mark.parametrize("who", VIEW_ONLY)
def test_a_view_only_user_sees_the_url_only_masked(roles, client, who):
    url = "postgresql://app:PWMARKER5e2@db.internal:5432/orders?sslpassword=PWMARKER5e2"
    target = TargetFactory(name="orders-staging", connection_url=url)
    client.force_login(view_only_user(who))

    pages = {
        name: client.get(reverse(f"admin:migrations_ops_target_{name}", args=args))
        for name, args in [("change", [target.pk]), ("history", [target.pk]), ("changelist", [])]
    }

    for name, response in pages.items():
        assert response.status_code == 200, name
        assert "PWMARKER5e2" not in body(response), f"the password shows on the {name} page"
    shown = text(body(pages["change"]))
    assert "postgresql://app:***@db.internal:5432/orders?sslpassword=***" in shown
    assert "Connection URL" not in shown  # only the masked row, not the field read-only


# --- editing a target ------------------------------------------------------------------------
def target_form(target, **changes) -> dict:
    data = {
        "name": target.name,
        "environment": target.environment,
        "convention": target.convention,
        "connection_url": "",
        "schema": target.schema,
        "statement_timeout_seconds": str(target.statement_timeout_seconds),
    }
    if target.requires_approval:
        data["requires_approval"] = "on"
    return {**data, **changes}


def test_editing_a_target_with_the_url_left_blank_keeps_it(superuser_client):
    old_url = "postgresql://app:OLDSECRET@db.internal:5432/orders"
    target = TargetFactory(name="orders-staging", connection_url=old_url)

    response = superuser_client.post(
        reverse("admin:migrations_ops_target_change", args=[target.pk]),
        target_form(target, statement_timeout_seconds="120"),
    )

    assert response.status_code == 302
    target.refresh_from_db()
    assert target.connection_url == old_url
    assert target.statement_timeout_seconds == 120
    event = AuditEvent.objects.get(action="target.changed", target=target)
    assert event.door == "admin"
    assert event.details == {"statement_timeout_seconds": 120}  # the URL was not changed
    assert "OLDSECRET" not in str(event.details)


def test_a_new_url_is_recorded_masked(superuser_client):
    target = TargetFactory(connection_url="postgresql://app:OLDSECRET@db.internal:5432/orders")

    response = superuser_client.post(
        reverse("admin:migrations_ops_target_change", args=[target.pk]),
        target_form(target, connection_url="postgresql://app:NEWSECRET@db2.internal:5432/orders"),
    )

    assert response.status_code == 302
    target.refresh_from_db()
    assert target.connection_url == "postgresql://app:NEWSECRET@db2.internal:5432/orders"
    event = AuditEvent.objects.get(action="target.changed", target=target)
    assert event.details == {"connection_url": "postgresql://app:***@db2.internal:5432/orders"}


# --- history is read-only --------------------------------------------------------------------
@pytest.fixture
def history():
    target = TargetFactory()
    operation = Operation.objects.create(
        kind="force_unlock",
        target=target,
        status=OperationStatus.SUCCEEDED,
        requested_by_name="oncall-engineer",
        door="admin",
        reason="stuck",
    )
    event = AuditEvent.objects.create(
        actor_name="oncall-engineer",
        door="admin",
        action="operation.requested",
        target=target,
        target_name=target.name,
        operation=operation,
    )
    return {"operation": operation, "auditevent": event}


@pytest.mark.parametrize("model", ["operation", "auditevent"])
def test_operations_and_audit_events_are_read_only_even_for_a_superuser(
    superuser_client, history, model
):
    obj = history[model]
    client = superuser_client
    url = lambda view, *args: reverse(f"admin:migrations_ops_{model}_{view}", args=args)  # noqa: E731
    before = type(obj).objects.filter(pk=obj.pk).values().get()

    changelist = client.get(url("changelist"))
    assert changelist.status_code == 200
    assert url("add") not in body(changelist)
    assert 'value="delete_selected"' not in body(changelist)
    assert client.get(url("add")).status_code == 403
    change = client.get(url("change", obj.pk))
    assert change.status_code == 200
    assert 'name="_save"' not in body(change)
    assert url("delete", obj.pk) not in body(change)
    edit = {
        "reason": "rewritten",
        "status": "failed",
        "action": "tampered",
        "actor_name": "someone-else",
        "_save": "Save",
    }
    assert client.post(url("change", obj.pk), edit).status_code == 403
    assert client.get(url("delete", obj.pk)).status_code == 403
    assert client.post(url("delete", obj.pk), {"post": "yes"}).status_code == 403
    client.post(
        url("changelist"),
        {"action": "delete_selected", "_selected_action": [obj.pk], "post": "yes"},
    )

    assert type(obj).objects.filter(pk=obj.pk).values().get() == before


# --- the operation page ----------------------------------------------------------------------
def test_operation_page_reloads_itself_until_the_operation_finishes(
    oncall, pg_target, django_capture_on_commit_callbacks
):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = oncall.post(confirm_url(target), {"reason": "stuck"})
    operation = Operation.objects.get(target=target)
    refresh = '<meta http-equiv="refresh"'

    queued = oncall.get(response["Location"])
    assert operation.status == OperationStatus.QUEUED
    assert refresh in body(queued)
    assert "this page reloads every 2 s" in body(queued)
    Operation.objects.filter(pk=operation.pk).update(status=OperationStatus.RUNNING)
    assert refresh in body(oncall.get(operation_url(operation)))
    Operation.objects.filter(pk=operation.pk).update(status=OperationStatus.QUEUED)

    for callback in callbacks:  # the task is sent and runs
        callback()

    operation.refresh_from_db()
    assert operation.status == OperationStatus.SUCCEEDED
    finished = oncall.get(operation_url(operation))
    assert refresh not in body(finished)
    assert "reloads every" not in body(finished)


# --- the two-person rule in the admin -----------------------------------------------------------
@pytest.fixture
def awaiting(pg_target, oncall, engineer):
    """A production release requested by the on-call engineer, awaiting approval."""
    from migrations_ops import services
    from migrations_ops.actors import Actor

    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(
        db=pg_target, name="orders-prod", environment=Environment.PRODUCTION, requires_approval=True
    )
    operation = services.request_force_unlock(
        actor=Actor.for_user(engineer, "admin"),
        target=target,
        reason="stuck",
        confirm_name="orders-prod",
    )
    assert operation.status == OperationStatus.AWAITING_APPROVAL
    return operation


def decide(client, operation, decision, reason=""):
    return client.post(
        reverse("admin:migrations_ops_operation_decide", args=[operation.pk]),
        {"decision": decision, "reason": reason},
        follow=True,
    )


def test_a_commander_approves_on_the_operation_page(
    awaiting, client, pg_target, django_capture_on_commit_callbacks
):
    commander = UserFactory(
        username="commander",
        permissions=[*ON_CALL_PERMISSIONS, "migrations_ops.approve_operation"],
    )
    client.force_login(commander)
    page = body(client.get(reverse("admin:migrations_ops_operation_change", args=[awaiting.pk])))
    assert "Approve and run" in page
    assert 'http-equiv="refresh"' not in page
    with django_capture_on_commit_callbacks(execute=True):
        response = decide(client, awaiting, "approve")
    assert f"Operation #{awaiting.pk} approved." in text(body(response))
    awaiting.refresh_from_db()
    assert awaiting.status == OperationStatus.SUCCEEDED
    assert awaiting.approved_by == commander
    assert pg_target.runbook_lock_rows() == []


def test_the_requester_cannot_approve_even_with_a_crafted_post(
    awaiting, oncall, engineer, pg_target
):
    from django.contrib.auth.models import Permission

    engineer.user_permissions.add(Permission.objects.get(codename="approve_operation"))
    response = decide(oncall, awaiting, "approve")
    assert "a different person must approve it" in text(body(response))
    awaiting.refresh_from_db()
    assert awaiting.status == OperationStatus.AWAITING_APPROVAL
    assert len(pg_target.runbook_lock_rows()) == 1


def test_without_the_approve_permission_a_crafted_post_is_forbidden(awaiting, client, pg_target):
    client.force_login(UserFactory(username="other-oncall", permissions=ON_CALL_PERMISSIONS))
    page = body(client.get(reverse("admin:migrations_ops_operation_change", args=[awaiting.pk])))
    assert "Approve and run" not in page
    response = client.post(
        reverse("admin:migrations_ops_operation_decide", args=[awaiting.pk]),
        {"decision": "approve"},
    )
    assert response.status_code == 403
    awaiting.refresh_from_db()
    assert awaiting.status == OperationStatus.AWAITING_APPROVAL


def test_a_rejection_needs_a_reason_and_ends_the_request(awaiting, client, pg_target):
    client.force_login(
        UserFactory(
            username="commander",
            permissions=[*ON_CALL_PERMISSIONS, "migrations_ops.approve_operation"],
        )
    )
    refused = text(body(decide(client, awaiting, "reject")))
    assert "A reason is required to reject an operation" in refused  # the admin capitalises
    decide(client, awaiting, "reject", reason="wait for the DBA")
    awaiting.refresh_from_db()
    assert awaiting.status == OperationStatus.CANCELLED
    assert awaiting.decision_reason == "wait for the DBA"
    assert len(pg_target.runbook_lock_rows()) == 1


# --- history at scale ------------------------------------------------------------------------
def paginator_text(response) -> str:
    """The page links and the count, without the 'Show all' link."""
    found = re.search(r'<p class="paginator">(.*?)</p>', body(response), re.DOTALL)
    return text(found.group(1)).removesuffix(" Show all")


def seed_history(target, start: int, stop: int) -> None:
    """Operations and audit events number ``start`` to ``stop - 1``, three requesters."""
    operations = Operation.objects.bulk_create(
        Operation(
            kind="verify",
            target=target,
            status=OperationStatus.SUCCEEDED,
            requested_by_name=f"requester{i % 3}",
            door="cli",
            reason=f"check {i}",
        )
        for i in range(start, stop)
    )
    AuditEvent.objects.bulk_create(
        AuditEvent(
            actor_name=f"requester{i % 3}",
            door="cli",
            action="operation.requested",
            target=target,
            target_name=target.name,
            operation=operation,
        )
        for i, operation in zip(range(start, stop), operations, strict=True)
    )


def history_pages(target) -> dict[str, list[str]]:
    year = dt.datetime.now(dt.UTC).year
    return {
        "operation": [
            "",
            "?p=2",
            "?status__exact=succeeded",
            f"?door__exact=cli&target__id__exact={target.pk}",
            f"?requested={year}",
            "?q=requester1",
            f"?q={target.name}",
        ],
        "auditevent": [
            "",
            "?p=2",
            f"?door__exact=cli&target={target.name}",
            "?action=operation.requested",
            f"?created={year}",
            "?q=requester1",
            f"?q={target.name}",
        ],
    }


@pytest.mark.parametrize("model", ["operation", "auditevent"])
def test_history_changelists_run_as_many_queries_whatever_the_rows_and_never_count_them_all(
    superuser_client, model, monkeypatch
):
    from django.contrib import admin
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    model_admin = admin.site.get_model_admin(
        {"operation": Operation, "auditevent": AuditEvent}[model]
    )
    monkeypatch.setattr(model_admin, "list_per_page", 10)  # several pages, even when filtered
    target = TargetFactory(name="orders-staging")
    changelist = reverse(f"admin:migrations_ops_{model}_changelist")

    def queries(rows: int) -> dict[str, list[str]]:
        seen = {}
        for query in history_pages(target)[model]:
            with CaptureQueriesContext(connection) as captured:
                response = superuser_client.get(changelist + query)
            assert response.status_code == 200, query
            if not query:  # counted exactly: a small table (and the superuser's creation and
                # login on it)
                if model == "auditevent":
                    rows += AuditEvent.objects.filter(action__startswith="user.").count()
                counted = f"{rows} {model_admin.opts.verbose_name_plural}"
                assert re.search(rf"(^| ){counted}$", paginator_text(response))
            seen[query] = [q["sql"] for q in captured.captured_queries]
        return seen

    seed_history(target, 0, 40)
    few = queries(40)
    seed_history(target, 40, 100)
    more = queries(100)

    for query, statements in more.items():
        assert len(statements) == len(few[query]) <= 12, query
        for sql in statements:
            assert "DISTINCT" not in sql.upper(), (query, sql)
            if re.search(r"\bCOUNT\(", sql, re.IGNORECASE):
                assert re.search(r"\bLIMIT \d+\)", sql), (query, sql)  # a capped count only


def test_a_large_history_shows_an_estimate_and_every_page_still_opens(
    superuser_client, monkeypatch
):
    from django.contrib import admin

    from migrations_ops import large_tables

    monkeypatch.setattr(large_tables, "EXACT_COUNT_LIMIT", 5)  # 60 rows count as a large table
    monkeypatch.setattr(admin.site.get_model_admin(Operation), "list_per_page", 10)
    seed_history(TargetFactory(), 0, 60)
    changelist = reverse("admin:migrations_ops_operation_changelist")

    first = superuser_client.get(changelist)
    last = superuser_client.get(changelist + "?p=6")

    assert re.search(r" about \d+ operations$", paginator_text(first))
    assert "requester0" in text(body(first))
    assert last.status_code == 200
    assert re.search(r" 6 60 operations$", paginator_text(last))  # exact on the last page
    assert len(re.findall(r'class="field-id"', body(last))) == 10


@pytest.mark.django_db(transaction=True)
def test_the_user_is_told_when_the_broker_is_down(oncall, pg_target):
    """The request is kept (outbox) and the person who asked knows it has not left yet."""
    from tests.broker import broker_down

    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target)
    with broker_down():
        response = oncall.post(confirm_url(target), {"reason": "stuck"})
    operation = Operation.objects.get(target=target)
    assert operation.status == OperationStatus.QUEUED
    page = text(body(oncall.get(response["Location"])))
    assert "The task broker could not be reached: the operation stays queued" in page
    assert AuditEvent.objects.filter(operation=operation, action="operation.send_failed").exists()
    assert len(pg_target.runbook_lock_rows()) == 1


# --- the incident an operation serves ------------------------------------------------------------
def incident_on(target, status="detected", *, hours_ago=1, title=None):
    incident = IncidentFactory(
        status=status,
        opened_at=timezone.now() - dt.timedelta(hours=hours_ago),
        **({"title": title} if title else {}),
    )
    if target is not None:
        incident.affected_targets.add(target)
    return incident


def incident_options(markup: str) -> list[tuple[str, bool, str]]:
    """(value, selected, label) of each option of the form's Incident choice, in order."""
    select = re.search(r'<select name="incident"[^>]*>(.*?)</select>', markup, re.DOTALL)
    assert select, "no Incident choice on the page"
    return [
        (value, bool(selected), html.unescape(label))
        for value, selected, label in re.findall(
            r'<option value="([^"]*)"( selected)?>(.*?)</option>', select.group(1)
        )
    ]


def test_the_release_page_offers_incidents_affecting_the_target_first(oncall, pg_target):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target, name="orders")
    elsewhere = incident_on(TargetFactory(), hours_ago=0, title="billing slow")
    here = incident_on(target, hours_ago=2, title="orders lock stuck")
    resolved_here = incident_on(target, "resolved", hours_ago=3, title="orders rollback")
    incident_on(target, "closed", title="last month")

    options = incident_options(body(oncall.get(confirm_url(target))))

    assert options == [
        ("", False, "none"),
        (str(here.pk), True, f"#{here.pk} orders lock stuck (detected, affects orders)"),
        (
            str(resolved_here.pk),
            False,
            f"#{resolved_here.pk} orders rollback (resolved, affects orders)",
        ),
        (str(elsewhere.pk), False, f"#{elsewhere.pk} billing slow (detected)"),
    ]


def test_nothing_is_preselected_unless_exactly_one_open_incident_affects_the_target(
    oncall, pg_target
):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target)
    incident_on(target, "resolved")
    incident_on(None)

    def chosen() -> list[str]:
        options = incident_options(body(oncall.get(confirm_url(target))))
        return [label for _, selected, label in options if selected]

    assert chosen() == ["none"]
    incident_on(target)
    incident_on(target, "mitigating")
    assert chosen() == ["none"]


def test_releasing_for_an_incident_links_them_both_ways(
    oncall, pg_target, django_capture_on_commit_callbacks
):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target)
    incident = incident_on(TargetFactory())

    response = release(
        oncall, target, django_capture_on_commit_callbacks, reason="stuck", incident=incident.pk
    )

    operation = Operation.objects.get(target=target)
    assert response.status_code == 302
    assert operation.incident == incident
    page = body(oncall.get(operation_url(operation)))
    incident_url = reverse("admin:incidents_incident_change", args=[incident.pk])
    assert f'<a href="{incident_url}">#{incident.pk} {incident.title}</a>' in page

    oncall.force_login(UserFactory(username="commander", is_superuser=True))
    page = body(oncall.get(incident_url))
    assert (
        f'<a href="{operation_url(operation)}">#{operation.pk} Force-release migration lock on '
        f"{target.name}</a> (succeeded)"
    ) in page


def test_an_incident_closed_since_the_page_was_shown_is_refused_in_one_line(
    oncall, pg_target, django_capture_on_commit_callbacks
):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target)
    incident = incident_on(target, "closed")

    response = release(
        oncall, target, django_capture_on_commit_callbacks, reason="stuck", incident=incident.pk
    )

    assert response.status_code == 200
    assert f"incident #{incident.pk} is closed: operations can no longer be linked to it" in text(
        body(response)
    )
    assert Operation.objects.count() == 0
    assert len(pg_target.runbook_lock_rows()) == 1


def test_an_unknown_incident_is_a_form_error(oncall, pg_target, django_capture_on_commit_callbacks):
    pg_target.create_runbook_books(lock_age=STALE)
    target = TargetFactory(db=pg_target)

    response = release(
        oncall, target, django_capture_on_commit_callbacks, reason="stuck", incident="999999"
    )

    assert response.status_code == 200
    assert "Select a valid choice." in text(body(response))
    assert Operation.objects.count() == 0


def test_a_health_url_is_set_on_the_target_form(superuser_client):
    target = TargetFactory(name="orders-staging")

    response = superuser_client.post(
        reverse("admin:migrations_ops_target_change", args=[target.pk]),
        target_form(target, health_url="orders.internal/healthz"),
    )

    assert response.status_code == 302
    target.refresh_from_db()
    assert target.health_url == "https://orders.internal/healthz"
    event = AuditEvent.objects.get(action="target.changed", target=target)
    assert event.details == {"health_url": "https://orders.internal/healthz"}
