"""A target's password never leaves the console: with a unique marker as the password of real
PostgreSQL targets (trust auth accepts any), every admin page, every `ops` command that can
run here, every API endpoint (error paths included), the error pages and every log line are
searched for it, and so are the console's own rows and a raw read of the targets table."""

from __future__ import annotations

import io
import json
import logging
import uuid

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.urls import reverse

from migrations_ops import roles
from migrations_ops.fields import PREFIX
from migrations_ops.models import Operation, OperationStatus, Target
from tests.factories import TargetFactory
from tests.opsconsole.console import (
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
            connection_url=with_password(pg_target.url, MARKER) + "?sslmode=bogus",
        ),
    ]
    return console


class Seen:
    """Everything the console said, to search for the marker."""

    def __init__(self):
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, text) -> None:
        self.texts.append((where, text if isinstance(text, str) else repr(text)))

    def response(self, where: str, response) -> None:
        body = b"".join(response.streaming_content) if response.streaming else response.content
        headers = "\n".join(f"{k}: {v}" for k, v in response.items())
        self.add(where, f"{response.status_code}\n{headers}\n{body.decode(errors='replace')}")

    def leaks(self) -> list[str]:
        return [where for where, text in self.texts if MARKER in text]


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
    superuser = logged_in(console.users["superuser"])
    superuser.raise_request_exception = False  # a server error is answered with its page

    # The connection works with the marker in it: the scan is of a target really used.
    assert MARKER in Target.objects.get(name="shop").connection_url
    assert console.shop_db.query("SELECT count(*) FROM migrations")[0][0] == 2

    # --- every admin page ----------------------------------------------------------------------
    pages = admin_urls(console)
    for target in (console.shop, console.down, *console.odd):
        pages += [
            ("target change", reverse("admin:migrations_ops_target_change", args=[target.pk])),
            ("target history", reverse("admin:migrations_ops_target_history", args=[target.pk])),
            ("force unlock", reverse("admin:migrations_ops_target_force_unlock", args=[target.pk])),
            ("flags", reverse("admin:migrations_ops_target_flags", args=[target.pk])),
            *(
                ("operate", reverse("admin:migrations_ops_target_operate", args=[target.pk, slug]))
                for slug in ("apply", "rollback", "fix-books", "cleanup")
            ),
        ]
    pages += [
        ("search", reverse("admin:migrations_ops_target_changelist") + "?q=shop"),
        ("export", reverse("admin:migrations_ops_auditevent_export") + "?target=shop"),
    ]
    for name, url in pages:
        if name == "logout":
            continue
        seen.response(f"GET {url}", superuser.get(url))

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
    url = reverse("admin:migrations_ops_target_changelist")
    for action in ("refresh_status", "verify_targets"):
        selected = [console.down.pk, console.shop.pk, *(target.pk for target in console.odd)]
        data = {"action": action, "_selected_action": selected}
        seen.response(f"POST {url} {action}", superuser.post(url, {**data, "index": "0"}))

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
    staff = Client(enforce_csrf_checks=False, raise_request_exception=False)
    staff.force_login(console.users[roles.INCIDENT_COMMANDER])
    anonymous = Client(raise_request_exception=False)
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
            ("staff", staff, {}),
            ("nobody", anonymous, {}),
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

    # The operations that failed to connect say why, without the password.
    failed = Operation.objects.filter(target__name="shop-down", status=OperationStatus.FAILED)
    assert failed.exists()
    assert all("cannot connect" in operation.error for operation in failed)

    # --- the server error page (DEBUG off) -------------------------------------------------
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
        ("GET", reverse("admin:migrations_ops_target_changelist"), superuser),
        ("GET", reverse("admin:migrations_ops_target_change", args=[lost.pk]), superuser),
        ("GET", "/api/migrations/status?live=1", staff),
    ]
    for method, url, client in errors:
        response = client.get(url)
        assert response.status_code == 500, url
        seen.response(f"{method} {url} (server error)", response)
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

    assert len(seen.texts) > 300
    assert seen.leaks() == []
