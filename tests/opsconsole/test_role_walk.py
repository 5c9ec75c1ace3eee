"""Every admin URL against the roles: the Auditor reads everything and changes nothing, whatever
it posts; every admin action and confirmation page needs its permission, and the role that
holds it can use it.

What the walk may legitimately leave behind, left out of the comparison: the Auditor's own
session (django_session) and login records (axes' AccessLog), and the audit events that reading
itself records — logins and CSV exports of the history (an export is on the history by design)
— and those its refused posts record (every refusal is on the history by design, too).
"""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.contrib.messages import get_messages
from django.test import RequestFactory
from django.urls import reverse

from migrations_ops import roles
from migrations_ops.models import AuditEvent, FlagChange, Operation, OperationStatus
from tests.opsconsole.console import (
    admin_urls,
    build_console,
    logged_in,
    model_rows,
    running_operations,
)

pytestmark = pytest.mark.django_db

# Audit events that reading records by itself (see the module's docstring).
READING_EVENTS = {"user.logged_in", "user.logged_out", "history.exported"}
READING_MODELS = {"sessions.Session", "axes.AccessLog", "migrations_ops.AuditEvent"}

# Every admin action and the role meant to use it; a new action fails the walk until listed.
ACTION_ROLES = {
    ("migrations_ops.Target", "emergency_disable"): roles.ON_CALL,
    ("migrations_ops.Target", "force_unlock"): roles.ON_CALL,
    ("migrations_ops.Target", "refresh_status"): roles.ON_CALL,
    ("migrations_ops.Target", "verify_targets"): roles.ON_CALL,
    ("migrations_ops.Target", "dry_run_apply"): roles.ON_CALL,
    ("migrations_ops.Target", "apply"): roles.ON_CALL,
    ("migrations_ops.Target", "dry_run_rollback"): roles.ON_CALL,
    ("migrations_ops.Target", "rollback"): roles.ON_CALL,
    ("migrations_ops.Target", "cleanup"): roles.ON_CALL,
    ("migrations_ops.Target", "fix_books"): roles.ON_CALL,
    ("migrations_ops.Target", "delete_selected"): roles.CONSOLE_ADMIN,
    ("migrations_ops.ApiToken", "revoke"): roles.CONSOLE_ADMIN,
    ("incidents.Incident", "run_checks"): roles.INCIDENT_COMMANDER,
    ("incidents.RecoveryObjective", "delete_selected"): roles.INCIDENT_COMMANDER,
    ("incidents.Drill", "run_now"): roles.ON_CALL,
    ("auth.User", "delete_selected"): roles.CONSOLE_ADMIN,
    ("auth.Group", "delete_selected"): roles.CONSOLE_ADMIN,
    ("otp_totp.TOTPDevice", "delete_selected"): roles.CONSOLE_ADMIN,
    ("axes.AccessAttempt", "delete_selected"): roles.CONSOLE_ADMIN,
    ("axes.AccessAttempt", "cleanup_expired_attempts"): roles.CONSOLE_ADMIN,
    ("axes.AccessLog", "delete_selected"): roles.CONSOLE_ADMIN,
    ("axes.AccessFailureLog", "delete_selected"): roles.CONSOLE_ADMIN,
}
BEAT_ACTIONS = {
    "django_celery_beat.PeriodicTask": [
        "delete_selected",
        "enable_tasks",
        "disable_tasks",
        "toggle_tasks",
        "run_tasks",
    ],
    "django_celery_beat.CrontabSchedule": ["delete_selected"],
    "django_celery_beat.IntervalSchedule": ["delete_selected"],
    "django_celery_beat.SolarSchedule": ["delete_selected"],
    "django_celery_beat.ClockedSchedule": ["delete_selected"],
}
for _label, _names in BEAT_ACTIONS.items():
    ACTION_ROLES.update({(_label, name): roles.CONSOLE_ADMIN for name in _names})


@pytest.fixture
def console(roles, pg_target, sqlite_target, tmp_path):
    return build_console(pg_target, sqlite_target, tmp_path)


def history_state() -> dict:
    """Every model's rows but what reading records, and the audit events other than those."""
    state = model_rows(skip=READING_MODELS)
    state["audit events"] = list(
        AuditEvent.objects.exclude(action__in=READING_EVENTS)
        .exclude(action__startswith="refused.")
        .order_by("pk")
        .values_list()
    )
    return state


def targets_state(console) -> dict:
    """What the targets' own databases hold (read live): books, lock, tables."""
    state = {}
    for name, db in [("shop", console.shop_db), ("billing", console.billing_db)]:
        state[name] = (
            db.query("SELECT filename FROM migrations ORDER BY filename"),
            db.runbook_lock_rows(),
        )
    state["shop tables"] = console.shop_db.query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1",
        [console.shop_db.schema],
    )
    state["billing tables"] = console.billing_db.query(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    )
    return state


def form_data(form) -> dict:
    """A form's own initial data, as a browser would post it back."""
    data = {}
    for bound in form:
        value = bound.value()
        if value is None or value is False:
            continue
        if value is True:
            data[bound.html_name] = "on"
        elif isinstance(value, list | tuple):
            data[bound.html_name] = [str(item) for item in value]
        else:
            data[bound.html_name] = str(value)
    return data


def plausible_posts(console, superuser_client, name: str, url: str) -> list[dict]:
    """What someone allowed would post to ``url``: its form's initial data (read as a superuser)
    with a reason and whatever the console's own forms ask; every action of a changelist."""
    extras = {
        "reason": "checking the door",
        "confirm_name": console.shop.name,
        "text": "checking the door",
        "evidence": "seen",
        "result": "passed",
        "decision": "approve",
        "title": "a follow-up",
        "kind": "corrective",
        "status": "resolved",
        "level": "2",
        "step": "1",
        "direction": "applied",
        "version": "003",
        "_save": "Save",
    }
    response = superuser_client.get(url)
    context = response.context or {}
    if name.endswith("_changelist") and "cl" in context:
        model_admin = context["cl"].model_admin
        ids = [str(pk) for pk in context["cl"].model._default_manager.values_list("pk", flat=True)]
        # The list's own form (list_editable), and every action on every row.
        posts: list[dict] = [{"index": "0", "_save": "Save", "form-TOTAL_FORMS": "0"}]
        for action in model_admin.get_actions(response.wsgi_request):
            posts.append({"action": action, "_selected_action": ids, "index": "0", "post": "yes"})
        return posts
    form = context.get("adminform")
    form = form.form if form is not None else context.get("form")
    base = form_data(form) if form is not None else {}
    posted = {**base, **extras}
    if name == "migrations_ops_target_flags":
        return [{**posted, "form": "flags", "AUTO_MIGRATE": ""}, {**posted, "form": "reenable"}]
    return [posted]


def test_the_console_has_operations_in_several_states(console):
    assert set(Operation.objects.values_list("status", flat=True)) >= {
        OperationStatus.SUCCEEDED,
        OperationStatus.FAILED,
        OperationStatus.AWAITING_APPROVAL,
    }


def test_the_walk_knows_every_admin_url(console):
    names = {name for name, _ in admin_urls(console)}
    for custom in [
        "migrations_ops_target_force_unlock",
        "migrations_ops_target_operate",
        "migrations_ops_target_flags",
        "migrations_ops_target_emergency_disable",
        "migrations_ops_operation_decide",
        "migrations_ops_auditevent_export",
        "incidents_incident_act",
        "incidents_incident_postmortem",
        "incidents_objectives_report",
        "incidents_lessons_learned",
        "migrations_ops_target_history",
        "otp_totp_totpdevice_qrcode",
    ]:
        assert custom in names


def test_the_auditor_reads_every_admin_page_and_changes_nothing_by_posting(console):
    superuser = logged_in(console.users["superuser"])
    auditor = logged_in(console.users[roles.AUDITOR])
    urls = admin_urls(console)
    posts = {
        (name, url): plausible_posts(console, superuser, name, url)
        for name, url in urls
        if name not in {"logout"}
    }
    before, live_before = history_state(), targets_state(console)
    walk_starts_after = AuditEvent.objects.order_by("-pk").values_list("pk", flat=True).first()

    reads = {}
    for name, url in urls:
        response = auditor.get(url)
        reads[url] = response.status_code
        # 404: the index of an app the Auditor has nothing to read in.
        allowed = {200, 302, 403, 405} | ({404} if name == "app_list" else set())
        assert response.status_code in allowed, (url, response.status_code)
    # The Auditor sees the history: the lists, the pages, the exports, the reports.
    for readable in [
        reverse("admin:migrations_ops_auditevent_changelist"),
        reverse("admin:migrations_ops_auditevent_export"),
        reverse("admin:migrations_ops_operation_change", args=[console.awaiting.pk]),
        reverse("admin:migrations_ops_target_history", args=[console.shop.pk]),
        reverse("admin:migrations_ops_target_flags", args=[console.shop.pk]),
        reverse("admin:incidents_incident_change", args=[console.incident.pk]),
        reverse("admin:incidents_incident_postmortem", args=[console.closed_incident.pk]),
        reverse("admin:incidents_objectives_report"),
        reverse("admin:incidents_lessons_learned"),
    ]:
        assert auditor.get(readable).status_code == 200, readable
    assert history_state() == before
    assert targets_state(console) == live_before

    answers = {}
    for (name, url), datas in posts.items():
        refused = {200, 403, 405} | ({404} if name == "app_list" else set())
        for data in datas:
            response = auditor.post(url, data)
            status = response.status_code
            answers[(url, data.get("action"))] = status
            if status == 302:
                # Refused with a message, or sent back to a page the Auditor may read.
                errors = [m for m in get_messages(response.wsgi_request) if m.level_tag == "error"]
                assert errors or not response.url.startswith(url), (url, data.get("action"))
            else:
                assert status in refused, (url, data.get("action"), status)
            assert history_state() == before, (url, data.get("action"))
    assert targets_state(console) == live_before
    refusals = AuditEvent.objects.filter(action__startswith="refused.", pk__gt=walk_starts_after)
    assert set(refusals.values_list("actor_name", flat=True)) == {"auditor"}
    assert refusals.filter(action="refused.http_403").exists()
    # The doors that would change something answer 403.
    for refused in [
        reverse("admin:migrations_ops_target_force_unlock", args=[console.shop.pk]),
        reverse("admin:migrations_ops_target_operate", args=[console.shop.pk, "apply"]),
        reverse("admin:migrations_ops_target_flags", args=[console.shop.pk]),
        reverse("admin:migrations_ops_target_emergency_disable"),
        reverse("admin:migrations_ops_operation_decide", args=[console.awaiting.pk]),
        reverse("admin:migrations_ops_target_change", args=[console.shop.pk]),
        reverse("admin:migrations_ops_target_add"),
    ]:
        assert answers[(refused, None)] == 403, refused
    assert Operation.objects.get(pk=console.awaiting.pk).status == (
        OperationStatus.AWAITING_APPROVAL
    )


def actions_of(user, model_admin) -> set[str]:
    request = RequestFactory().get("/")
    request.user = user
    return set(model_admin.get_actions(request))


def test_every_admin_action_is_listed_with_the_role_that_uses_it(console):
    found = {
        (model._meta.label, name)
        for model, model_admin in admin.site._registry.items()
        for name in actions_of(console.users["superuser"], model_admin)
    }
    assert found == set(ACTION_ROLES)


@pytest.mark.parametrize(("action_key", "role"), sorted(ACTION_ROLES.items()))
def test_an_action_needs_its_permission_and_its_role_can_use_it(console, action_key, role):
    label, name = action_key
    model = next(m for m in admin.site._registry if m._meta.label == label)
    model_admin = admin.site._registry[model]
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
    selected = [str(model._default_manager.order_by("pk").values_list("pk", flat=True)[0])]
    if label == "migrations_ops.Target":
        selected = [str(console.shop.pk)]
    data = {"action": name, "_selected_action": selected, "index": "0"}

    # The Auditor and every role meant to do something else neither see it nor can use it.
    clients = {other: logged_in(user) for other, user in console.users.items()}
    for other, user in console.users.items():
        if other in {role, "superuser"}:
            continue
        if name in actions_of(user, model_admin):
            continue  # a role that holds this permission too (checked below for the owner)
        before = history_state()
        response = clients[other].post(url, data)
        # 200: a list without any action for them, where a POST is only a page to read.
        assert response.status_code in {200, 302, 403}, (other, response.status_code)
        if response.status_code == 302:
            shown = [str(m) for m in get_messages(response.wsgi_request)]
            assert any("No action selected" in text for text in shown), (other, shown)
        assert history_state() == before, other
    assert name not in actions_of(console.users[roles.AUDITOR], model_admin)

    # The role that holds it sees it, and Django runs it.
    owner = console.users[role]
    assert name in actions_of(owner, model_admin)
    response = clients[role].post(url, data)
    shown = [str(m) for m in get_messages(response.wsgi_request)]
    assert response.status_code in {200, 302}, response.status_code
    assert not any("No action selected" in text for text in shown), shown


def act(console, slug):
    return reverse("admin:incidents_incident_act", args=[console.incident.pk, slug])


# Each confirmation page and form view: (who may, who may not, URL, data, what the allowed
# person's post leaves behind).
CUSTOM_VIEWS = {
    "force-unlock": (
        roles.ON_CALL,
        roles.CONSOLE_ADMIN,
        lambda c: reverse("admin:migrations_ops_target_force_unlock", args=[c.shop.pk]),
        {"reason": "deploy-9 crashed"},
        lambda c: c.shop_db.runbook_lock_rows() == [],
    ),
    "operate": (
        roles.ON_CALL,
        roles.CONSOLE_ADMIN,
        lambda c: reverse("admin:migrations_ops_target_operate", args=[c.sandbox.pk, "cleanup"]),
        {"reason": "tidy the lock table"},
        lambda c: Operation.objects.filter(kind="cleanup", target=c.sandbox).exists(),
    ),
    "flags": (
        roles.ON_CALL,
        roles.CONSOLE_ADMIN,
        lambda c: reverse("admin:migrations_ops_target_flags", args=[c.sandbox.pk]),
        {
            "form": "flags",
            "AUTO_MIGRATE": "",
            "MIGRATION_DRY_RUN": "",
            "MIGRATION_MAX_RETRIES": "3",
            "MIGRATION_LOCK_TIMEOUT": "60",
            "MIGRATION_CACHE_TTL": "300",
            "reason": "sandbox off",
        },
        lambda c: FlagChange.objects.filter(target=c.sandbox).exists(),
    ),
    "emergency-disable": (
        roles.ON_CALL,
        roles.CONSOLE_ADMIN,
        lambda c: reverse("admin:migrations_ops_target_emergency_disable") + f"?ids={c.sandbox.pk}",
        {"reason": "sandbox off"},
        lambda c: FlagChange.objects.filter(target=c.sandbox, kind="emergency_disable").exists(),
    ),
    "decide": (
        roles.INCIDENT_COMMANDER,
        roles.ON_CALL,
        lambda c: reverse("admin:migrations_ops_operation_decide", args=[c.awaiting.pk]),
        {"decision": "reject", "reason": "not during the incident"},
        lambda c: Operation.objects.get(pk=c.awaiting.pk).status == OperationStatus.CANCELLED,
    ),
    "incident note": (
        roles.INCIDENT_COMMANDER,
        roles.ON_CALL,
        lambda c: act(c, "note"),
        {"text": "holder gone"},
        lambda c: c.incident.timeline.filter(text__contains="holder gone").exists(),
    ),
}


@pytest.mark.parametrize("view", sorted(CUSTOM_VIEWS))
def test_a_custom_view_needs_its_permission_and_its_role_can_use_it(console, view):
    allowed, refused, url_of, data, done = CUSTOM_VIEWS[view]
    url = url_of(console)
    clients = {role: logged_in(console.users[role]) for role in (allowed, refused)}
    before = history_state()

    response = clients[refused].post(url, data)
    if response.status_code == 302:  # the service refused it, with a message
        errors = [m for m in get_messages(response.wsgi_request) if m.level_tag == "error"]
        shown = [str(m) for m in get_messages(response.wsgi_request)]
        assert any("not allowed" in str(m) for m in errors), (response.url, shown)
    else:
        assert response.status_code == 403
    assert history_state() == before
    assert not done(console)

    with running_operations():
        response = clients[allowed].post(url, data)
    form = (response.context or {}).get("form")
    assert response.status_code == 302, form.errors if form is not None else response.status_code
    assert done(console)
