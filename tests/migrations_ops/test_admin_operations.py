"""Every operation as an admin action, through its confirmation page."""

import datetime as dt

import pytest
from django.urls import reverse

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.admin.target_operations import TARGET_ACTIONS
from migrations_ops.models import Environment, Operation, OperationStatus
from migrations_ops.roles import AUDITOR, ON_CALL
from tests.factories import IncidentFactory, TargetFactory, member
from tests.migrations_ops.test_admin import body, incident_options, text
from tests.scripts_folder import EMAIL, ORDERS, USERS, apply_directly, write_folder

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]


@pytest.fixture
def shop(any_target, tmp_path):
    any_target.create_runbook_books()
    apply_directly(any_target, USERS, EMAIL)
    target = TargetFactory(db=any_target, name="shop", lock_timeout_seconds=2, max_retries=0)
    services.import_scripts(
        actor=Actor.shell_operator(),
        target=target,
        directory=write_folder(tmp_path, USERS, EMAIL, ORDERS),
    )
    target.db = any_target
    return target


@pytest.fixture
def oncall(client):
    client.force_login(member(ON_CALL, "oncall"))
    return client


def operate_url(target, slug):
    return reverse("admin:migrations_ops_target_operate", args=[target.pk, slug])


def submit(client, target, slug, data, callbacks):
    with callbacks(execute=True):
        response = client.post(operate_url(target, slug), data)
    return response


def test_apply_page_shows_the_sql_then_applies(oncall, shop, django_capture_on_commit_callbacks):
    page = text(body(oncall.get(operate_url(shop, "apply"))))
    assert "003_create_orders.sql (up)" in page
    assert "CREATE TABLE orders" in page

    response = submit(
        oncall,
        shop,
        "apply",
        {"reason": "release 9", "to_version": ""},
        django_capture_on_commit_callbacks,
    )
    operation = Operation.objects.get(kind="apply")
    assert response.status_code == 302
    assert response["Location"] == reverse(
        "admin:migrations_ops_operation_change", args=[operation.pk]
    )
    assert operation.status == OperationStatus.SUCCEEDED, operation.error
    assert ("003_create_orders.sql",) in shop.db.query("SELECT filename FROM migrations")


def test_a_dry_run_is_shown_on_the_real_run_page(oncall, shop, django_capture_on_commit_callbacks):
    submit(oncall, shop, "dry-run-apply", {}, django_capture_on_commit_callbacks)
    dry_run = Operation.objects.get()
    assert dry_run.status == OperationStatus.SUCCEEDED and dry_run.params["dry_run"]
    page = text(body(oncall.get(operate_url(shop, "apply"))))
    assert f"Latest dry run: #{dry_run.pk}" in page
    assert "table_added: orders" in page
    assert ("003_create_orders.sql",) not in shop.db.query("SELECT filename FROM migrations")


def test_rollback_page_offers_applied_versions_latest_first(
    oncall, shop, django_capture_on_commit_callbacks
):
    page = body(oncall.get(operate_url(shop, "rollback")))
    assert page.index('value="002"') < page.index('value="001"')
    assert "ALTER TABLE users DROP COLUMN email" in page
    refused = submit(
        oncall,
        shop,
        "rollback",
        {"reason": "x", "version": "001"},
        django_capture_on_commit_callbacks,
    )
    assert "needs the explicit out-of-order override" in text(body(refused))
    submit(
        oncall,
        shop,
        "rollback",
        {"reason": "bad column", "version": "002"},
        django_capture_on_commit_callbacks,
    )
    assert Operation.objects.get().status == OperationStatus.SUCCEEDED
    assert shop.db.query("SELECT filename FROM migrations") == [("001_create_users.sql",)]


def test_a_second_operation_on_the_target_is_refused_with_the_one_in_progress(oncall, shop):
    first = services.request_cleanup(actor=Actor.shell_operator(), target=shop, reason="x")
    page = text(
        body(
            oncall.post(
                operate_url(shop, "fix-books"),
                {
                    "reason": "x",
                    "version": "003",
                    "direction": "applied",
                },
            )
        )
    )
    assert f"operation #{first.pk} (Clean up the lock table, queued) is already in progress" in page
    link = reverse("admin:migrations_ops_operation_change", args=[first.pk])
    assert f'<a href="{link}">open it</a>' in body(
        oncall.post(operate_url(shop, "cleanup"), {"reason": "x"})
    )


def test_fix_books_and_cleanup_pages(oncall, shop, django_capture_on_commit_callbacks):
    submit(
        oncall,
        shop,
        "fix-books",
        {"reason": "ran by hand", "version": "003", "direction": "applied"},
        django_capture_on_commit_callbacks,
    )
    assert ("003_create_orders.sql",) in shop.db.query("SELECT filename FROM migrations")
    shop.db.take_runbook_lock(lock_age=dt.timedelta(minutes=5), locked_by="gone")
    submit(oncall, shop, "cleanup", {"reason": "stale"}, django_capture_on_commit_callbacks)
    assert shop.db.runbook_lock_rows() == []


@pytest.mark.parametrize("slug", [action.slug for action in TARGET_ACTIONS])
def test_every_page_serves_an_incident_and_refuses_a_closed_one(
    oncall, shop, slug, django_capture_on_commit_callbacks
):
    rollout = IncidentFactory(title="rollout 9")
    rollout.affected_targets.add(shop)
    closed = IncidentFactory(status="closed")
    options = incident_options(body(oncall.get(operate_url(shop, slug))))
    assert (str(rollout.pk), True, f"#{rollout.pk} rollout 9 (detected, affects shop)") in options
    assert str(closed.pk) not in [value for value, _, _ in options]
    form = {
        "reason": "rollout 9 cleanup",
        "version": "002" if "rollback" in slug else "003",
        "direction": "applied",
    }

    refused = submit(
        oncall, shop, slug, {**form, "incident": closed.pk}, django_capture_on_commit_callbacks
    )
    assert refused.status_code == 200
    assert f"incident #{closed.pk} is closed: operations can no longer be linked to it" in text(
        body(refused)
    )
    assert not Operation.objects.exists()

    submit(oncall, shop, slug, {**form, "incident": rollout.pk}, django_capture_on_commit_callbacks)
    assert Operation.objects.get().incident == rollout


@pytest.mark.django_db(transaction=True)
def test_verify_action_reports_problems(oncall, shop):
    """Committed for real, so the in-process verify has run when the message is written."""
    response = oncall.post(
        reverse("admin:migrations_ops_target_changelist"),
        {"action": "verify_targets", "_selected_action": [shop.pk]},
        follow=True,
    )
    assert "Shop: verify" in text(body(response))  # the admin capitalises messages
    assert "1 problem(s)" in text(body(response))


def test_production_needs_the_typed_name_and_a_second_person(
    client, pg_target, tmp_path, django_capture_on_commit_callbacks
):
    pg_target.create_runbook_books()
    apply_directly(pg_target, USERS, EMAIL)
    target = TargetFactory(
        db=pg_target, name="shop-prod", environment=Environment.PRODUCTION, requires_approval=True
    )
    services.import_scripts(
        actor=Actor.shell_operator(),
        target=target,
        directory=write_folder(tmp_path, USERS, EMAIL, ORDERS),
    )
    client.force_login(member(ON_CALL, "oncall"))
    refused = submit(
        client,
        target,
        "apply",
        {"reason": "x", "confirm_name": "shop"},
        django_capture_on_commit_callbacks,
    )
    assert "shop-prod is a production target: type its name" in text(body(refused))
    submit(
        client,
        target,
        "apply",
        {"reason": "x", "confirm_name": "shop-prod"},
        django_capture_on_commit_callbacks,
    )
    assert Operation.objects.get().status == OperationStatus.AWAITING_APPROVAL


@pytest.mark.parametrize("slug", ["apply", "dry-run-apply", "rollback", "cleanup", "fix-books"])
def test_an_auditor_gets_no_action_and_no_page(client, shop, slug):
    client.force_login(member(AUDITOR, "auditor"))
    changelist = body(client.get(reverse("admin:migrations_ops_target_changelist")))
    assert 'value="apply"' not in changelist and 'value="verify_targets"' not in changelist
    assert client.get(operate_url(shop, slug)).status_code == 403
    assert client.post(operate_url(shop, slug), {"reason": "x"}).status_code == 403
    assert Operation.objects.count() == 0
