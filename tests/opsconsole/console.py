"""A console as people find it after a busy week, and a walk over every admin URL it serves.

Shared by the role walk and the secret-marker scan: both need every page filled with real
objects, and both must notice a new admin view (``admin_urls`` fails on a URL it cannot fill).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import io
from dataclasses import dataclass, field

from django.apps import apps
from django.contrib import admin
from django.contrib.auth.models import Group
from django.core.management import CommandError, call_command
from django.test import Client, TestCase
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from incidents import services as incident_services
from incidents.admin_views import INCIDENT_FORMS
from incidents.models import DrillRun, DrillRunStatus, IncidentStatus, Scenario
from migrations_ops import roles, services
from migrations_ops.actors import Actor
from migrations_ops.admin.target_operations import ACTIONS_BY_SLUG
from migrations_ops.models import AlertThresholds, Door, Environment, Target
from tests.factories import TargetFactory, UserFactory
from tests.scripts_folder import EMAIL, ORDERS, USERS, apply_directly, write_folder
from tests.targets import new_sqlite_target

ROLE_USERNAMES = {
    roles.ON_CALL: "oncall",
    roles.INCIDENT_COMMANDER: "commander",
    roles.AUDITOR: "auditor",
    roles.CONSOLE_ADMIN: "consoleadmin",
}


@dataclass
class Console:
    shop: Target  # PostgreSQL, a stale lock held by a crashed deploy
    billing: Target  # SQLite, under the two-person rule
    sandbox: Target  # SQLite, for drills
    shop_db: object
    billing_db: object
    users: dict = field(default_factory=dict)  # role name → user; "superuser" too
    incident: object = None  # open, with action items and checklist
    closed_incident: object = None  # closed, with an addendum
    awaiting: object = None  # an operation awaiting approval
    raw_token: str = ""


def running_operations():
    """Run the operations requested inside the block when it ends, as the commit would."""
    return TestCase.captureOnCommitCallbacks(execute=True)


def logged_in(user):
    client = Client()
    client.force_login(user)
    return client


def member(role: str):
    user = UserFactory(username=ROLE_USERNAMES[role])
    user.groups.add(Group.objects.get(name=role))
    return user


def actor(user) -> Actor:
    return Actor.for_user(user, Door.ADMIN)


def restore_seeded_rows() -> None:
    """The rows data migrations seed (recovery objectives, escalation contacts): a
    transactional test run earlier flushed every table, and the walk needs them."""
    from django.apps import apps

    for module, function in [
        ("incidents.migrations.0002_seed_recovery_objectives", "seed"),
        (
            "incidents.migrations.0008_seed_escalation_contacts_addenda_append_only_roles",
            "seed_contacts",
        ),
    ]:
        getattr(importlib.import_module(module), function)(apps, None)


def build_console(pg_target, sqlite_target, tmp_path, *, shop_url: str | None = None) -> Console:
    """Targets with books and imported scripts, operations in several states, flag changes,
    incidents, an API token, a drill with a run, a TOTP device, login records and beat
    schedules: every admin list has rows. ``shop_url``: the URL stored for ``shop``."""
    restore_seeded_rows()
    users = {role: member(role) for role in ROLE_USERNAMES}
    users["superuser"] = UserFactory(username="root", is_superuser=True)
    on_call, commander = actor(users[roles.ON_CALL]), actor(users[roles.INCIDENT_COMMANDER])
    console_admin = actor(users[roles.CONSOLE_ADMIN])

    pg_target.create_runbook_books(lock_age=dt.timedelta(minutes=30), locked_by="deploy-9")
    apply_directly(pg_target, USERS, EMAIL)
    shop = TargetFactory(
        db=pg_target, name="shop", connection_url=shop_url or pg_target.url, health_url=""
    )
    sqlite_target.create_runbook_books()
    apply_directly(sqlite_target, USERS, EMAIL)
    billing = TargetFactory(db=sqlite_target, name="billing", requires_approval=True)
    sandbox_db = new_sqlite_target(tmp_path)
    sandbox_db.create_runbook_books()
    apply_directly(sandbox_db, USERS, EMAIL)
    sandbox = TargetFactory(db=sandbox_db, name="sandbox", environment=Environment.SANDBOX)

    folder = write_folder(tmp_path / "migrations", USERS, EMAIL, ORDERS)
    for target in (shop, billing, sandbox):
        services.import_scripts(actor=on_call, target=target, directory=str(folder))

    # A target whose database is gone: its verify fails.
    gone = TargetFactory(name="legacy", connection_url=f"sqlite:///{tmp_path / 'gone' / 'x.db'}")
    for request in [
        lambda: services.request_verify(actor=on_call, target=gone),
        lambda: services.request_verify(actor=on_call, target=shop),
        lambda: services.request_apply(actor=on_call, target=sandbox, reason="", dry_run=True),
        lambda: services.request_verify(actor=on_call, target=billing),
    ]:
        with running_operations():
            request()
    awaiting = services.request_apply(actor=on_call, target=billing, reason="ship orders")
    services.change_flags(
        actor=on_call, target=billing, changes={"MIGRATION_MAX_RETRIES": 2}, reason="flaky"
    )
    services.emergency_disable(actor=on_call, targets=[shop], reason="lock stuck")

    incident = incident_services.open_incident(
        actor=commander,
        title="shop lock stuck",
        scenario=Scenario.CONCURRENT_CONFLICT,
        severity="sev2",
        targets=[shop],
        culprit_migration="003_create_orders.sql",
        impact_started_at=None,
    )
    incident_services.add_note(actor=commander, incident=incident, text="deploy-9 crashed")
    incident_services.add_action_item(
        actor=commander,
        incident=incident,
        title="release the lock on crash",
        kind="corrective",
        owner=users[roles.INCIDENT_COMMANDER],
    )
    closed = incident_services.open_incident(
        actor=commander,
        title="billing rollback",
        scenario=Scenario.OTHER,
        severity="sev3",
        targets=[billing],
    )
    incident_services.change_status(actor=commander, incident=closed, status="resolved")
    for item in closed.checklist.all():
        incident_services.tick_checklist_item(
            actor=commander, item=item, passed=True, evidence="seen"
        )
    closed.root_cause = "a bad script"
    closed.no_action_items_reason = "the script is gone"
    incident_services.update_incident(
        actor=commander, incident=closed, changed=["root_cause", "no_action_items_reason"]
    )
    closed = incident_services.change_status(
        actor=commander, incident=closed, status=IncidentStatus.CLOSED
    )
    incident_services.add_addendum(actor=commander, incident=closed, text="found later")

    services.save_alert_thresholds(
        actor=console_admin,
        thresholds=AlertThresholds(lock_held_seconds=45, failure_rate=0.2, retry_rate=0.5),
        changed=["lock_held_seconds"],
    )
    _, raw_token = services.create_api_token(actor=console_admin, name="shop-app", targets=[shop])
    drill = incident_services.schedule_drill(
        actor=console_admin, kind="lock_release", target=sandbox
    )
    # A run as the worker leaves it (running one for real kills processes: test_drills does).
    DrillRun.objects.create(
        drill=drill, status=DrillRunStatus.FAILED, started_by="drill:lock_release", error="x"
    )
    _other_admin_rows(users)
    return Console(
        shop=shop,
        billing=billing,
        sandbox=sandbox,
        shop_db=pg_target,
        billing_db=sqlite_target,
        users=users,
        incident=incident,
        closed_incident=closed,
        awaiting=awaiting,
        raw_token=raw_token,
    )


def _other_admin_rows(users) -> None:
    """Rows of the third-party admins: a TOTP device, beat schedules, login records."""
    from axes.models import AccessAttempt, AccessFailureLog, AccessLog
    from django_celery_beat.models import ClockedSchedule, IntervalSchedule, SolarSchedule
    from django_otp.plugins.otp_totp.models import TOTPDevice

    TOTPDevice.objects.create(user=users[roles.CONSOLE_ADMIN], name="phone")
    IntervalSchedule.objects.create(every=30, period=IntervalSchedule.SECONDS)
    SolarSchedule.objects.create(event="sunrise", latitude=48.85, longitude=2.35)
    ClockedSchedule.objects.create(clocked_time=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    record = {"ip_address": "10.0.0.9", "user_agent": "curl", "username": "mallory"}
    AccessAttempt.objects.create(**record, failures_since_start=3)
    AccessLog.objects.create(**record)
    AccessFailureLog.objects.create(**record, locked_out=False)


# --- the admin's URLs ------------------------------------------------------------------------
def _patterns(resolver, prefix=""):
    for pattern in resolver.url_patterns:
        if isinstance(pattern, URLResolver):
            yield from _patterns(pattern, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern), pattern


def admin_model_of(name: str):
    """The model whose ModelAdmin serves the admin URL named ``name``, and the rest of the name
    (``changelist``, ``change``, ``force_unlock``); None for a page of no model."""
    for model in admin.site._registry:
        prefix = f"{model._meta.app_label}_{model._meta.model_name}_"
        if name.startswith(prefix):
            return model, name[len(prefix) :]
    return None, name


def _first_pk(model):
    pk = model._default_manager.order_by("pk").values_list("pk", flat=True).first()
    if pk is None:
        raise AssertionError(f"the walk has no {model._meta.label} to fill its admin URLs with")
    return pk


def admin_urls(console: Console) -> list[tuple[str, str]]:
    """(URL name, URL) for every admin URL pattern, filled with the console's objects: every
    object-free page once; every target, operation and incident view for each of its slugs.
    A pattern with an argument the walk does not know fails, so that a new view joins it."""
    filled = {
        "target_id": [console.shop.pk],
        "operation_id": [console.awaiting.pk],
        "incident_id": [console.incident.pk, console.closed_incident.pk],
    }
    slugs = {
        "migrations_ops_target_operate": list(ACTIONS_BY_SLUG),
        "incidents_incident_act": list(INCIDENT_FORMS),
    }
    urls = []
    for route, pattern in _patterns(get_resolver()):
        if not route.startswith("admin/"):
            continue
        name = pattern.name
        if name is None:
            # Django's redirect of an object's bare URL to its change page, and the catch-all.
            if route == "admin/(?P<url>.*)$" or route.endswith("/<path:object_id>/"):
                continue
            raise AssertionError(f"the role walk does not know the admin URL {route}")
        arguments = sorted(pattern.pattern.converters) or sorted(pattern.pattern.regex.groupindex)
        if name == "app_list":
            urls += [
                (name, reverse("admin:app_list", args=[label]))
                for label in sorted({m._meta.app_label for m in admin.site._registry})
            ]
            continue
        if name == "view_on_site":
            continue  # a redirect to the object's own site: the console's models have none
        model = admin_model_of(name)[0]
        if not arguments:
            urls.append((name, reverse(f"admin:{name}")))
        elif arguments in (["object_id"], ["id"], ["pk"]) and model is not None:
            urls.append((name, reverse(f"admin:{name}", args=[_first_pk(model)])))
        elif set(arguments) <= {*filled, "slug"}:
            main = next(argument for argument in arguments if argument != "slug")
            for value in filled[main]:
                for slug in slugs.get(name, [None]) if "slug" in arguments else [None]:
                    kwargs = {main: value, **({"slug": slug} if slug else {})}
                    urls.append((name, reverse(f"admin:{name}", kwargs=kwargs)))
        else:
            raise AssertionError(
                f"the role walk does not know how to fill the admin URL {route} ({name}): "
                "add it to tests/opsconsole/console.py"
            )
    return urls


# --- what changed ----------------------------------------------------------------------------
def model_rows(skip=()) -> dict[str, tuple[int, str]]:
    """Every model's row count and a hash of its rows' values (``skip``: labels left out)."""
    state = {}
    for model in apps.get_models():
        label = model._meta.label
        if label in skip:
            continue
        rows = model._default_manager.order_by("pk").values_list()
        digest = hashlib.sha256(repr(list(rows)).encode()).hexdigest()
        state[label] = (len(rows), digest)
    return state


def ops(*args) -> tuple[str, str, int]:
    """Run ``manage.py ops ARGS``: (stdout, stderr, exit status)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("ops", *args, stdout=out, stderr=err)
    except CommandError as error:
        return out.getvalue(), err.getvalue() + str(error), error.returncode
    except SystemExit as error:
        return out.getvalue(), err.getvalue(), int(error.code or 0)
    return out.getvalue(), err.getvalue(), 0
