"""The runtime flags in the admin: the Flags page, the emergency-disable action and its
confirmation, the read-only history, and who may do what."""

import pytest
from django.urls import reverse

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import AuditEvent, Environment, FlagChange, FlagStage, Target
from migrations_ops.roles import AUDITOR, ON_CALL
from tests.factories import TargetFactory, member
from tests.migrations_ops.test_admin import body, text

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]

CHANGELIST = "admin:migrations_ops_target_changelist"
DISABLE = "admin:migrations_ops_target_emergency_disable"


@pytest.fixture
def on_call(client):
    client.force_login(member(ON_CALL, "oncall"))
    return client


@pytest.fixture
def auditor(client):
    client.force_login(member(AUDITOR, "auditor"))
    return client


@pytest.fixture
def orders():
    return TargetFactory(name="orders-db", max_retries=3)


def flags_url(target):
    return reverse("admin:migrations_ops_target_flags", args=[target.pk])


def flag_form(target, reason="a reason", **changes):
    data = {
        "form": "flags",
        "AUTO_MIGRATE": "on" if target.auto_migrate else "",
        "MIGRATION_DRY_RUN": "on" if target.migration_dry_run else "",
        "MIGRATION_MAX_RETRIES": str(target.max_retries),
        "MIGRATION_LOCK_TIMEOUT": str(target.lock_timeout_seconds),
        "MIGRATION_CACHE_TTL": str(target.cache_ttl_seconds),
        "EMERGENCY_BYPASS": "on" if target.emergency_bypass else "",
        "reason": reason,
    }
    return {key: value for key, value in {**data, **changes}.items() if value != ""}


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def test_the_flags_page_changes_flags_and_shows_the_history(on_call, orders):
    response = on_call.post(
        flags_url(orders),
        flag_form(orders, reason="loop in prod", AUTO_MIGRATE="", MIGRATION_MAX_RETRIES="0"),
        follow=True,
    )

    assert messages_of(response) == [
        "Flags of orders-db changed: AUTO_MIGRATE true → false, MIGRATION_MAX_RETRIES 3 → 0."
    ]
    orders.refresh_from_db()
    assert (orders.auto_migrate, orders.max_retries) == (False, 0)
    change = FlagChange.objects.get()
    assert change.door == "admin" and change.actor_name == "oncall"
    page = text(body(response))
    assert "AUTO_MIGRATE false" in page
    assert "oncall Admin Set AUTO_MIGRATE true → false, MIGRATION_MAX_RETRIES 3 → 0" in page
    assert "loop in prod" in page


def test_a_negative_retry_count_is_refused_on_the_page_and_changes_nothing(on_call, orders):
    response = on_call.post(
        flags_url(orders), flag_form(orders, MIGRATION_MAX_RETRIES="-1"), follow=True
    )
    assert messages_of(response) == [
        "MIGRATION_MAX_RETRIES=-1: Ensure this value is greater than or equal to 0."
    ]
    assert Target.objects.get(pk=orders.pk).max_retries == 3
    assert FlagChange.objects.count() == 0


def test_a_form_without_reason_or_change_changes_nothing(on_call, orders):
    response = on_call.post(flags_url(orders), flag_form(orders, reason="", AUTO_MIGRATE=""))
    assert "This field is required." in body(response)
    response = on_call.post(flags_url(orders), flag_form(orders), follow=True)
    assert messages_of(response) == ["nothing to change: no flag given"]
    assert FlagChange.objects.count() == 0
    assert Target.objects.get(pk=orders.pk).auto_migrate is True


def test_emergency_disable_action_confirms_then_disables_the_selected_targets(on_call, orders):
    billing = TargetFactory(name="billing-db", environment=Environment.PRODUCTION)
    search = TargetFactory(name="search-db")

    response = on_call.post(
        reverse(CHANGELIST),
        {"action": "emergency_disable", "_selected_action": [orders.pk, billing.pk]},
        follow=True,
    )
    page = text(body(response))
    assert "orders-db Staging true false 3" in page
    assert "billing-db Production" in page
    assert "search-db" not in page
    assert "Type DISABLE to confirm" in page
    confirm_url = response.redirect_chain[-1][0]

    refused = on_call.post(confirm_url, {"reason": "bad deploy", "confirm": "disable"})
    assert "Type DISABLE (in capitals)" in body(refused)
    assert FlagChange.objects.count() == 0

    done = on_call.post(confirm_url, {"reason": "bad deploy", "confirm": "DISABLE"}, follow=True)
    assert messages_of(done) == [
        "Auto-migration disabled on 2 target(s): orders-db, billing-db "
        "(AUTO_MIGRATE=false, MIGRATION_DRY_RUN=true, MIGRATION_MAX_RETRIES=0)."
    ]
    for target in (orders, billing):
        target.refresh_from_db()
        assert (target.auto_migrate, target.migration_dry_run, target.max_retries) == (
            False,
            True,
            0,
        )
        assert target.flag_stage == FlagStage.DISABLED
    assert Target.objects.get(pk=search.pk).auto_migrate is True
    assert FlagChange.objects.filter(kind="emergency_disable").count() == 2


def test_disable_all_needs_no_typing_without_production_targets(on_call, orders):
    other = TargetFactory(name="search-db")
    page = on_call.get(reverse(DISABLE) + "?all=1")
    assert "ALL 2 targets" in text(body(page))
    assert "Type DISABLE" not in body(page)
    on_call.post(reverse(DISABLE) + "?all=1", {"reason": "stop everything"})
    assert set(Target.objects.values_list("flag_stage", flat=True)) == {"disabled"}
    assert FlagChange.objects.filter(target=other).exists()


def test_the_reenable_panel_offers_only_the_next_step(on_call, orders):
    services.emergency_disable(actor=Actor.shell_operator(), targets=[orders], reason="incident")
    page = body(on_call.get(flags_url(orders)))
    assert "Take step 1: Dry run mode" in page
    assert "Take step 2" not in page and "Take step 3" not in page
    steps = text(page.split('id="reenable-steps"')[1].split("</table>")[0])
    assert "1. Dry run mode" in steps and "next" in steps and "not yet" in steps

    # a stale page posting step 2 out of order is refused with one message
    refused = on_call.post(
        flags_url(orders), {"form": "reenable", "step": "2", "reason": "x"}, follow=True
    )
    assert messages_of(refused) == ["step 2 is not due on orders-db: step 1 is next"]

    done = on_call.post(
        flags_url(orders), {"form": "reenable", "step": "1", "reason": "dry run"}, follow=True
    )
    assert messages_of(done) == [
        "Re-enable step 1 taken on orders-db: MIGRATION_DRY_RUN=true, AUTO_MIGRATE=true."
    ]
    assert "Take step 2: Limited rollout" in body(done)
    assert Target.objects.get(pk=orders.pk).flag_stage == FlagStage.DRY_RUN


def test_the_target_form_shows_the_flags_read_only_with_a_link(orders, admin_client):
    page = body(admin_client.get(reverse("admin:migrations_ops_target_change", args=[orders.pk])))
    assert flags_url(orders) in page
    assert 'name="max_retries"' not in page and 'name="lock_timeout_seconds"' not in page
    assert "AUTO_MIGRATE=true" in text(page)


def test_an_auditor_sees_the_flags_but_cannot_change_them(auditor, orders):
    page = auditor.get(flags_url(orders))
    assert page.status_code == 200
    assert 'id="flags-form"' not in body(page)
    assert auditor.post(flags_url(orders), flag_form(orders, AUTO_MIGRATE="")).status_code == 403
    assert auditor.get(reverse(DISABLE) + f"?ids={orders.pk}").status_code == 403
    assert auditor.post(reverse(DISABLE) + "?all=1", {"reason": "x"}).status_code == 403
    changelist = body(auditor.get(reverse(CHANGELIST)))
    assert 'value="emergency_disable"' not in changelist
    assert FlagChange.objects.count() == 0
    assert not AuditEvent.objects.filter(action="flags.changed").exists()
    assert Target.objects.get(pk=orders.pk).auto_migrate is True


def test_the_flag_history_admin_is_read_only(auditor, orders):
    services.change_flags(
        actor=Actor.shell_operator(),
        target=orders,
        changes={"AUTO_MIGRATE": False},
        reason="stop",
    )
    change = FlagChange.objects.get()
    listing = auditor.get(
        reverse("admin:migrations_ops_flagchange_changelist") + "?kind__exact=set"
    )
    assert listing.status_code == 200
    assert "AUTO_MIGRATE true → false" in text(body(listing))
    detail = auditor.get(reverse("admin:migrations_ops_flagchange_change", args=[change.pk]))
    assert detail.status_code == 200
    assert 'name="_save"' not in body(detail)
    assert auditor.get(reverse("admin:migrations_ops_flagchange_add")).status_code == 403


def test_the_target_form_ignores_posted_flags(admin_client, orders):
    from tests.migrations_ops.test_admin import target_form

    response = admin_client.post(
        reverse("admin:migrations_ops_target_change", args=[orders.pk]),
        target_form(orders, max_retries="9", lock_timeout_seconds="5"),
    )
    assert response.status_code == 302
    orders.refresh_from_db()
    assert (orders.max_retries, orders.lock_timeout_seconds) == (3, 60)


def test_the_fleet_dashboard_links_each_target_to_its_flags(admin_client, orders):
    assert flags_url(orders) in body(admin_client.get(reverse("admin:index")))
