"""A target's password never leaves the console: with a unique marker as the password of real
PostgreSQL targets (trust auth accepts any), every admin page, every `ops` command that can
run here, every API endpoint (error paths included), the error pages (the debug page too) and
every log line are searched for it, and so are the console's own rows and a raw read of the
targets table.

The admin and the API are read as every role: a superuser, each group the console defines
(roles.py) and, for every model the console's apps register in the admin, a staff user holding
only its view permission. Each reads every admin URL pattern (enumerated from the resolver by
``admin_urls``, so a new page is read without anyone adding it) and posts every admin action
it is offered with the marked targets selected, reading the confirmation page it leads to."""

from __future__ import annotations

import io
import json
import logging
import uuid

import pytest
from cryptography.fernet import Fernet
from django.contrib import admin
from django.core.management import call_command
from django.db import connection
from django.test import Client, RequestFactory
from django.urls import reverse

from migrations_ops import roles
from migrations_ops.fields import PREFIX
from migrations_ops.models import Operation, OperationStatus, Target
from tests.factories import TargetFactory, UserFactory
from tests.opsconsole.console import (
    ROLE_USERNAMES,
    admin_model_of,
    admin_urls,
    build_console,
    logged_in,
    ops,
    running_operations,
)

MARKER = f"pw-MARKER-{uuid.uuid4().hex}"
LOGGERS = ["", "django", "django.request", "celery", "celery.app.trace", "psycopg", "axes"]


def with_password(url: str, password: str, *, port: int | None = None) -> str:
    """``postgresql://postgres@host:5432/db`` with a password (and another port)."""
    url = url.replace("postgresql://postgres@", f"postgresql://postgres:{password}@")
    return url.replace(":5432/", f":{port}/") if port else url


class Collected(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))  # the message and any traceback


@pytest.fixture
def logs():
    """Every log record, at DEBUG, from the root logger and the chatty libraries'."""
    handler = Collected()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    saved = {}
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    yield handler
    for name in LOGGERS:
        logging.getLogger(name).removeHandler(handler)
        logging.getLogger(name).setLevel(saved[name])


@pytest.fixture
def console(roles, pg_target, sqlite_target, tmp_path, logs):
    console = build_console(
        pg_target, sqlite_target, tmp_path, shop_url=with_password(pg_target.url, MARKER)
    )
    # A target that cannot be reached, the marker in its URL: the error paths' turn.
    console.down = TargetFactory(
        name="shop-down",
        connection_url=with_password(pg_target.url, MARKER, port=1),
        schema=pg_target.schema,
    )
    # URLs the driver itself refuses, each differently: the messages it writes go through too.
    console.odd = [
        TargetFactory(
            name="shop-bad-port",
            connection_url=with_password(pg_target.url, MARKER, port=99999),
        ),
        TargetFactory(
            name="shop-bad-option",
            connection_url=with_password(pg_target.url, MARKER)
            + f"?sslmode=bogus&sslpassword={MARKER}",
        ),
    ]
    return console


class Seen:
    """Everything the console said, to search for the marker."""

    def __init__(self):
        self.texts: list[tuple[str, str]] = []
        self.answers: dict[str, tuple[int, str]] = {}  # where → status and body

    def add(self, where: str, text) -> None:
        self.texts.append((where, text if isinstance(text, str) else repr(text)))

    def response(self, where: str, response) -> None:
        body = b"".join(response.streaming_content) if response.streaming else response.content
        headers = "\n".join(f"{k}: {v}" for k, v in response.items())
        text = body.decode(errors="replace")
        self.answers[where] = (response.status_code, text)
        self.add(where, f"{response.status_code}\n{headers}\n{text}")

    def leaks(self) -> list[str]:
        return [where for where, text in self.texts if MARKER in text]


def view_permissions() -> list[str]:
    """The view permission of every model the console's apps register in the admin: each has
    list, object and history pages where a target's URL could appear."""
    return sorted(
        f"{model._meta.app_label}.view_{model._meta.model_name}"
        for model in admin.site._registry
        if model._meta.app_label in roles.HISTORY_APPS
    )


def viewers(console) -> dict:
    """Who reads the console: a superuser, each role, each view permission held alone."""
    users = {"superuser": console.users["superuser"]}
    users.update({role: console.users[role] for role in ROLE_USERNAMES})
    for permission in view_permissions():
        codename = permission.split(".")[1]
        users[f"only {permission}"] = UserFactory(
            username=f"only-{codename}", permissions=[permission]
        )
    return users


# Django's own views of a ModelAdmin: each checks the model's permissions before it reads
# anything (a user without them gets 403), unlike a custom view, which checks its own.
DJANGOS_OWN_VIEWS = {"changelist", "add", "change", "delete", "history", "autocomplete"}


def named(name: str, *args, query: str = "") -> tuple[str, str]:
    """(URL name, URL) of an admin page, as ``admin_urls`` gives them."""
    return name, reverse(f"admin:{name}", args=args) + query


def pages_to_read(who: str, pages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every page for a superuser and the roles. For a user holding one view permission: the
    pages of its model, of no model, and every custom view (a custom view that forgets its
    permission check shows up here); Django's own views of the other models answer them 403
    before reading anything, so reading them once per such user only costs time."""
    if not who.startswith("only "):
        return pages
    own = who.removeprefix("only ").replace(".view_", "_")
    kept = []
    for name, url in pages:
        model, view = admin_model_of(name or "")
        label = f"{model._meta.app_label}_{model._meta.model_name}" if model else None
        if model is None or label == own or view not in DJANGOS_OWN_VIEWS:
            kept.append((name, url))
    return kept


def reading_client(user) -> Client:
    client = logged_in(user)
    client.raise_request_exception = False  # a server error is answered with its page
    return client


# Actions that have no confirmation page and whose effect the scan cannot afford: a drill
# run stops a process for real (tests/incidents/test_drills.py runs one).
ACTIONS_NOT_RUN = {("incidents.Drill", "run_now")}


def actions_offered(user, model_admin) -> list[str]:
    request = RequestFactory().get("/")
    request.user = user
    return list(model_admin.get_actions(request))


def post_every_action(seen: Seen, who: str, user, client, marked_targets) -> None:
    """Every admin action the user is offered, posted from its list with rows selected (the
    marked targets for the targets' list), without the confirmation: the confirmation page
    (or the page an action leads to, with its messages) is read."""
    for model, model_admin in admin.site._registry.items():
        offered = actions_offered(user, model_admin)
        if not offered:
            continue
        meta = model._meta
        url = reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")
        if model is Target:
            selected = [target.pk for target in marked_targets]
        else:
            selected = list(model._default_manager.order_by("pk").values_list("pk", flat=True)[:3])
        for action in offered:
            if (meta.label, action) in ACTIONS_NOT_RUN:
                continue
            data = {"action": action, "_selected_action": selected, "index": "0"}
            with running_operations():
                response = client.post(url, data, follow=True)
            seen.response(f"{who}: POST {url} action {action}", response)


def console_rows() -> list[tuple[str, str]]:
    """Every row of the console's own database as the ORM reads it; a target's URL is left
    out (the field decrypts it to connect), and checked raw below."""
    from django.apps import apps

    rows = []
    for model in apps.get_models():
        fields = [
            f.attname
            for f in model._meta.concrete_fields
            if not (model is Target and f.name == "connection_url")
        ]
        rows.append((model._meta.label, repr(list(model._default_manager.values_list(*fields)))))
    return rows


@pytest.mark.django_db(transaction=True)
def test_the_password_appears_in_no_page_command_answer_log_or_row(
    console, logs, settings, tmp_path
):
    settings.DEBUG = False
    seen = Seen()
    readers = viewers(console)
    clients = {who: reading_client(user) for who, user in readers.items()}
    superuser = clients["superuser"]
    marked = [console.shop, console.down, *console.odd]

    # The connection works with the marker in it: the scan is of a target really used.
    assert MARKER in Target.objects.get(name="shop").connection_url
    assert console.shop_db.query("SELECT count(*) FROM migrations")[0][0] == 2

    # --- every admin page, as everyone -----------------------------------------------------
    pages = admin_urls(console)
    for target in marked:
        pages += [
            named(f"migrations_ops_target_{view}", target.pk)
            for view in ("change", "history", "force_unlock", "flags")
        ]
        pages += [
            named("migrations_ops_target_operate", target.pk, slug)
            for slug in ("apply", "rollback", "fix-books", "cleanup")
        ]
    pages += [
        named("migrations_ops_target_changelist", query="?q=shop"),
        named("migrations_ops_auditevent_export", query="?target=shop"),
        # Not found: an object that does not exist, a page that does not.
        ("missing", reverse("admin:migrations_ops_target_change", args=[999999])),
        ("missing", "/admin/migrations_ops/nothing-here/"),
    ]
    for who, client in clients.items():
        for name, url in pages_to_read(who, pages):
            if name != "logout":
                seen.response(f"{who}: GET {url}", client.get(url, follow=name == "missing"))
    # The pages were read, not refused: whoever may view targets sees the target's page, its
    # connection masked.
    shop_page = reverse("admin:migrations_ops_target_change", args=[console.shop.pk])
    for who in ["superuser", *ROLE_USERNAMES, "only migrations_ops.view_target"]:
        status, text = seen.answers[f"{who}: GET {shop_page}"]
        assert status == 200 and "postgres:***@127.0.0.1" in text, who

    # A change through the admin: the target's form, its URL left blank to keep it.
    form = {
        "name": "shop",
        "environment": "staging",
        "convention": "runbook",
        "connection_url": "",
        "schema": console.shop_db.schema,
        "lock_timeout_seconds": "90",
        "statement_timeout_seconds": "10",
    }
    url = reverse("admin:migrations_ops_target_change", args=[console.shop.pk])
    seen.response(f"POST {url}", superuser.post(url, form))
    # An operation that fails to connect, through the admin.
    url = reverse("admin:migrations_ops_target_force_unlock", args=[console.down.pk])
    with running_operations():
        seen.response(f"POST {url}", superuser.post(url, {"reason": "down", "release_fresh": "on"}))

    # --- every command that can run here ---------------------------------------------------
    folder = tmp_path / "migrations"
    commands = [
        ["status"],
        ["status", "--json"],
        ["status", "--target", "shop-down"],
        ["status", "--target", "shop-bad-port"],
        ["status", "--target", "shop-bad-option"],
        ["verify", "--target", "shop-bad-option"],
        ["verify", "--target", "shop"],
        ["verify", "--target", "shop-down", "--json"],
        ["import", "--target", "shop", "--dir", str(folder)],
        ["import", "--target", "shop-down", "--dir", str(folder)],
        ["flags", "--target", "shop"],
        ["flags", "--target", "shop-down", "--set", "MIGRATION_MAX_RETRIES=1", "--reason", "x"],
        ["up", "--target", "shop-down", "--dry-run", "--wait", "10"],
        ["unlock", "--target", "shop-down", "--reason", "down", "--force", "--wait", "10"],
        ["cleanup", "--target", "shop-down", "--reason", "down", "--wait", "10"],
        ["mark-applied", "--target", "shop-down", "--version", "003", "--reason", "x"],
        ["token", "list"],
        ["drill", "list"],
        ["audit-verify"],
        ["sweep"],
        ["automigrate", "--target", "shop"],
        ["automigrate", "--target", "shop-down", "--cache-file", str(tmp_path / "flags.json")],
        [
            *("register", "--name", "new-shop", "--convention", "runbook"),
            *("--environment", "staging", "--schema", console.shop_db.schema),
            *("--url", with_password(console.shop_db.url, MARKER)),
        ],
        [
            *("register", "--name", "bad-shop", "--convention", "runbook"),
            *("--environment", "staging", "--url", f"postgresql://u:{MARKER}@h:notaport/db"),
        ],
        ["rotate-secrets"],
        ["status", "--target", "new-shop"],
    ]
    for command in commands:
        out, err, status = ops(*command)
        seen.add(f"ops {' '.join(command)} (exit {status})", out + err)
    dump = io.StringIO()
    call_command("dumpdata", "migrations_ops.target", stdout=dump)
    seen.add("dumpdata", dump.getvalue())

    # --- every API endpoint ------------------------------------------------------------------
    token = {"HTTP_AUTHORIZATION": f"Bearer {console.raw_token}"}
    anonymous = Client(raise_request_exception=False)
    staff = clients[roles.INCIDENT_COMMANDER]
    operation = Operation.objects.order_by("-pk").first()
    gets = [
        "/api/openapi.json",
        "/api/migrations/status",
        "/api/migrations/status?live=1",
        "/api/migrations/status?target=shop&live=1",
        "/api/migrations/status?target=shop-down&live=1",
        "/api/migrations/status?target=nowhere",
        "/api/migrations/health",
        "/api/targets/shop/flags",
        "/api/targets/shop-down/flags",
        "/api/targets/nowhere/flags",
        f"/api/operations/{operation.pk}",
        "/api/operations/999999",
        "/api/nothing-here",
        "/metrics",
    ]
    for url in gets:
        for who, client, extra in [
            ("token", anonymous, token),
            ("nobody", anonymous, {}),
            *((who, client, {}) for who, client in clients.items()),
        ]:
            seen.response(f"GET {url} as {who}", client.get(url, **extra))
    posts = [
        ("/api/targets/shop-down/force-unlock", {"reason": "down", "release_fresh": True}),
        ("/api/targets/shop/force-unlock", {"reason": "stale", "confirm_name": "shop"}),
        ("/api/targets/nowhere/force-unlock", {"reason": "x"}),
        ("/api/targets/shop/force-unlock", "not json"),
        ("/api/targets/shop/force-unlock", {"reason": ""}),
        (f"/api/operations/{console.awaiting.pk}/reject", {"reason": "not now"}),
        ("/api/operations/999999/approve", {}),
    ]
    for url, body in posts:
        payload = body if isinstance(body, str) else json.dumps(body)
        for who, client, extra in [("token", anonymous, token), ("staff", staff, {})]:
            with running_operations():
                response = client.post(url, payload, content_type="application/json", **extra)
            seen.response(f"POST {url} as {who}", response)

    # --- every admin action, as everyone offered it: its confirmation page ------------------
    for who, client in clients.items():
        post_every_action(seen, who, readers[who], client, marked)

    # The operations that failed to connect say why, without the password.
    failed = Operation.objects.filter(target__name="shop-down", status=OperationStatus.FAILED)
    assert failed.exists()
    assert all("cannot connect" in operation.error for operation in failed)

    # --- the server error page, and Django's debug page ------------------------------------
    # A URL encrypted with a key the console no longer holds: every page loading it fails.
    lost_key = Fernet(Fernet.generate_key())
    stored = PREFIX + lost_key.encrypt(with_password(console.shop_db.url, MARKER).encode()).decode()
    lost = TargetFactory(name="shop-lost-key")
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Target._meta.db_table} SET connection_url = %s WHERE id = %s",
            [stored, lost.pk],
        )
    errors = [
        *(
            (who, url)
            for who in ("superuser", roles.AUDITOR)
            for url in [
                reverse("admin:migrations_ops_target_changelist"),
                reverse("admin:migrations_ops_target_change", args=[lost.pk]),
            ]
        ),
        (roles.INCIDENT_COMMANDER, "/api/migrations/status?live=1"),
    ]
    # The debug page (DEBUG stays on for the embedded console) shows the settings: the
    # console's own Redis URL there carries the marker as its password.
    redis_url = f"redis://:{MARKER}@127.0.0.1:6379/15"
    for debug in (False, True):
        settings.DEBUG = debug
        settings.REDIS_URL = settings.CELERY_RESULT_BACKEND = redis_url if debug else ""
        for who, url in errors:
            response = clients[who].get(url)
            assert response.status_code == 500, url
            assert debug == ("Traceback" in response.content.decode()), url
            seen.response(f"{who}: GET {url} (server error, DEBUG {debug})", response)
    settings.DEBUG = False
    out, err, status = ops("status")
    assert status == 1 and "cannot be decrypted" in err  # one line, no traceback
    seen.add(f"ops status (exit {status}) with a lost key", out + err)
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {Target._meta.db_table} WHERE id = %s", [lost.pk])

    # --- the console's rows, raw, and the logs -----------------------------------------------
    for label, text in console_rows():
        seen.add(f"rows of {label}", text)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {Target._meta.db_table}")
        seen.add("SELECT * FROM the targets table", cursor.fetchall())
    for index, line in enumerate(logs.lines):
        seen.add(f"log line {index}", line)

    assert len(seen.texts) > 2000  # every role read every page
    assert seen.leaks() == []
