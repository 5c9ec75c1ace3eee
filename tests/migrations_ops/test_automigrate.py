"""``ops automigrate``: what an application runs at start-up, obeying the flags the console keeps
for its target (read here or over HTTP, cached for MIGRATION_CACHE_TTL)."""

import contextlib
import io
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from migrations_ops import flag_client, services
from migrations_ops.actors import Actor
from migrations_ops.models import ApiToken, Operation, OperationKind, OperationStatus
from tests.factories import TargetFactory
from tests.scripts_folder import EMAIL, ORDERS, USERS, apply_directly, write_folder

# The command waits for its own operations, which are sent when their request commits.
pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shop(pg_target, tmp_path):
    """A target with 001 and 002 applied by the application and 003 pending."""
    pg_target.create_runbook_books()
    apply_directly(pg_target, USERS, EMAIL)
    target = TargetFactory(db=pg_target, name="shop", lock_timeout_seconds=2, max_retries=0)
    folder = write_folder(tmp_path / "migrations", USERS, EMAIL, ORDERS)
    services.import_scripts(actor=Actor.shell_operator(), target=target, directory=str(folder))
    return pg_target, target


def set_flags(target, **changes):
    services.change_flags(
        actor=Actor.shell_operator(), target=target, changes=changes, reason="test setup"
    )


def automigrate(cache_file, *args) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``ops automigrate --target shop``."""
    out, err = io.StringIO(), io.StringIO()
    command = ["ops", "automigrate", "--target", "shop", "--cache-file", str(cache_file)]
    try:
        call_command(*command, "--backoff", "0", *args, stdout=out, stderr=err)
    except CommandError as error:
        return error.returncode, out.getvalue(), str(error)
    return 0, out.getvalue(), err.getvalue()


def books(target_db) -> list[str]:
    return [row[0] for row in target_db.query("SELECT filename FROM migrations ORDER BY 1")]


def orders_exists(target_db) -> bool:
    return target_db.query("SELECT to_regclass('orders') IS NOT NULL")[0][0]


# --- the flags decide ----------------------------------------------------------------------------
def test_emergency_bypass_skips_all_migration_logic(shop, tmp_path):
    target_db, target = shop
    set_flags(target, EMERGENCY_BYPASS=True)
    code, out, _ = automigrate(tmp_path / "flags.json")
    assert code == 0
    assert "EMERGENCY_BYPASS=true" in out
    assert out.strip().endswith("bypass: migration logic skipped")
    assert not Operation.objects.exists()
    assert not orders_exists(target_db)


def test_auto_migrate_off_does_nothing(shop, tmp_path):
    target_db, target = shop
    set_flags(target, AUTO_MIGRATE=False)
    code, out, _ = automigrate(tmp_path / "flags.json")
    assert (code, out.strip().splitlines()[-1]) == (0, "auto-migration disabled")
    assert not Operation.objects.exists()
    assert books(target_db) == ["001_create_users.sql", "002_add_email.sql"]


def test_dry_run_previews_and_leaves_the_target_unchanged(shop, tmp_path):
    target_db, target = shop
    set_flags(target, MIGRATION_DRY_RUN=True)
    code, out, _ = automigrate(tmp_path / "flags.json")
    assert code == 0, out
    preview = Operation.objects.get()
    assert (preview.kind, preview.status, preview.params["dry_run"]) == ("apply", "succeeded", True)
    assert f"dry run (operation #{preview.pk}): would apply 003_create_orders.sql" in out
    assert "table_added: orders" in out
    assert "dry run: rolled back, nothing was changed" in out
    assert not orders_exists(target_db)
    assert books(target_db) == ["001_create_users.sql", "002_add_email.sql"]


def test_applies_what_is_pending_as_the_application(shop, tmp_path):
    target_db, _ = shop
    code, out, _ = automigrate(tmp_path / "flags.json", "--app", "shop-api")
    assert code == 0, out
    operation = Operation.objects.get()
    assert "pending on shop: 003_create_orders.sql" in out
    assert f"applied 003_create_orders.sql (operation #{operation.pk})" in out
    assert operation.status == OperationStatus.SUCCEEDED
    assert operation.requested_by_name.startswith("automigrate:shop-api@")
    assert operation.door == "cli"
    assert operation.params["lock_wait_seconds"] == 2
    assert orders_exists(target_db)
    assert books(target_db)[-1] == "003_create_orders.sql"

    code, out, _ = automigrate(tmp_path / "flags.json")
    assert code == 0
    assert "nothing to apply on shop: every imported script is applied" in out
    assert Operation.objects.count() == 1


@contextlib.contextmanager
def lock_kept_alive(target_db, holder="deploy-9 (pid 77)"):
    """Another migrator holding the lock and keeping it fresh (never stale) until the end."""
    target_db.take_runbook_lock(locked_by=holder)
    done = threading.Event()

    def refresh():
        while not done.wait(0.2):
            target_db.execute("UPDATE migration_lock SET locked_at = now()")

    keeper = threading.Thread(target=refresh, daemon=True)
    keeper.start()
    try:
        yield
    finally:
        done.set()
        keeper.join()


def test_a_lock_held_by_another_is_retried_as_operations_then_fails(shop, tmp_path):
    target_db, target = shop
    set_flags(target, MIGRATION_LOCK_TIMEOUT=1, MIGRATION_MAX_RETRIES=2)
    with lock_kept_alive(target_db):
        code, out, error = automigrate(tmp_path / "flags.json")
    assert code == 1
    attempts = list(Operation.objects.order_by("pk"))
    assert [(op.kind, op.status) for op in attempts] == [("apply", "failed")] * 3
    assert [op.params["auto_migrate"]["attempt"] for op in attempts] == [1, 2, 3]
    assert all("the migration lock is held by deploy-9 (pid 77)" in op.error for op in attempts)
    assert all("gave up after 1 attempt(s) of 1 s" in op.error for op in attempts)
    assert "attempt 3 of 3 failed" in out
    numbers = ", ".join(f"#{op.pk}" for op in attempts)
    assert error.startswith(f"auto-migration of shop failed after 3 attempt(s) ({numbers}): ")
    assert "\n" not in error
    assert not orders_exists(target_db)
    assert target_db.runbook_lock_rows() == [(1, "deploy-9 (pid 77)")]


def test_a_stale_lock_is_refused_without_waiting(shop, tmp_path):
    import datetime as dt

    target_db, _ = shop
    target_db.take_runbook_lock(lock_age=dt.timedelta(minutes=5), locked_by="gone")
    code, _, error = automigrate(tmp_path / "flags.json")
    assert code == 1
    assert "the migration lock of shop is stale" in error
    assert "force-release it first" in error
    assert not Operation.objects.exists()


def test_an_application_cannot_approve_its_own_migrations(shop, tmp_path):
    target_db, target = shop
    type(target).objects.filter(pk=target.pk).update(requires_approval=True)
    code, _, error = automigrate(tmp_path / "flags.json")
    assert code == 1
    assert "shop requires approval by a second person" in error
    assert "an application cannot approve its own migrations" in error
    assert not Operation.objects.exists()
    assert not orders_exists(target_db)


# --- the cache ---------------------------------------------------------------------------------
def test_flags_are_cached_for_their_ttl_then_read_again(shop, tmp_path):
    target_db, target = shop
    set_flags(target, AUTO_MIGRATE=False, MIGRATION_CACHE_TTL=2)
    cache_file = tmp_path / "cache" / "shop.json"
    _, out, _ = automigrate(cache_file)
    assert "flags of shop (console)" in out
    read_at = time.monotonic()

    set_flags(target, AUTO_MIGRATE=True)
    code, out, _ = automigrate(cache_file)
    assert time.monotonic() - read_at < 2, "too slow to test within the TTL"
    assert "flags of shop (cache): AUTO_MIGRATE=false" in out
    assert (code, out.strip().splitlines()[-1]) == (0, "auto-migration disabled")
    assert not Operation.objects.exists()

    time.sleep(max(0.0, 2.1 - (time.monotonic() - read_at)))
    code, out, _ = automigrate(cache_file)
    assert "flags of shop (console): AUTO_MIGRATE=true" in out
    assert code == 0 and orders_exists(target_db)


def flags_of_shop(**changes) -> dict:
    flags = {
        "AUTO_MIGRATE": True,
        "MIGRATION_DRY_RUN": False,
        "MIGRATION_MAX_RETRIES": 0,
        "MIGRATION_LOCK_TIMEOUT": 2,
        "MIGRATION_CACHE_TTL": 60,
        "EMERGENCY_BYPASS": False,
    }
    return {**flags, **changes}


UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens


def test_without_the_console_and_without_a_cache_it_refuses(shop, tmp_path):
    target_db, _ = shop
    code, _, error = automigrate(tmp_path / "f.json", "--console", UNREACHABLE, "--token", "t")
    assert code == 1
    assert error.startswith("cannot read the flags of shop: the console is unreachable at ")
    assert error.endswith("no flags are cached: refusing to migrate without knowing them")
    assert not Operation.objects.exists()
    assert not orders_exists(target_db)


def test_without_the_console_the_cached_flags_are_used_and_said_to_be(shop, tmp_path):
    cache_file = tmp_path / "f.json"
    source = flag_client.flags_url(UNREACHABLE, "shop")
    cache = flag_client.FlagCache(cache_file, source=source, target="shop")
    cache.save(flags_of_shop(AUTO_MIGRATE=False), etag='"x"', max_age=60, fetched_at=0)
    code, out, warning = automigrate(cache_file, "--console", UNREACHABLE, "--token", "t")
    assert code == 0
    assert "flags of shop (cache (console unreachable))" in out
    assert warning.startswith("warning: the console is unreachable at ")
    assert "using the flags cached " in warning
    assert out.strip().endswith("auto-migration disabled")


def test_console_without_token_is_one_line(shop, tmp_path):
    code, _, error = automigrate(tmp_path / "f.json", "--console", UNREACHABLE, "--token", "")
    assert (code, error) == (1, "--console needs --token (or OPSCONSOLE_TOKEN): an API token")


# --- over HTTP, from the console's flags endpoint ----------------------------------------------
def api_token_for(target, raw="shop-api-0123456789abcdef") -> str:
    token = ApiToken.objects.create(
        name="shop-api",
        prefix=raw[:12],
        token_hash=services.hash_api_token(raw),
        created_by_name="tests",
    )
    token.targets.add(target)
    return raw


def test_reads_the_flags_over_http_with_etag_and_ttl(shop, tmp_path, live_server):
    target_db, target = shop
    set_flags(target, MIGRATION_CACHE_TTL=1, AUTO_MIGRATE=False)
    token = api_token_for(target)
    cache_file = tmp_path / "http.json"
    http = ["--console", live_server.url, "--token", token]

    code, out, error = automigrate(cache_file, *http)
    assert code == 0, error
    assert "flags of shop (console): AUTO_MIGRATE=false" in out
    assert flag_client.FlagCache(
        cache_file, source=flag_client.flags_url(live_server.url, "shop"), target="shop"
    ).load()["etag"]

    time.sleep(1.1)
    code, out, _ = automigrate(cache_file, *http)
    assert "flags of shop (console (not modified)): AUTO_MIGRATE=false" in out

    set_flags(target, AUTO_MIGRATE=True)
    time.sleep(1.1)
    code, out, error = automigrate(cache_file, *http)
    assert code == 0, error
    assert "flags of shop (console): AUTO_MIGRATE=true" in out
    assert orders_exists(target_db)

    _, _, error = automigrate(tmp_path / "other.json", "--console", live_server.url, "--token", "x")
    assert error.startswith("cannot read the flags of shop: the console refused to give the flags")


def test_the_token_does_not_follow_the_console_to_another_origin(shop, tmp_path):
    from tests.health_server import running

    target_db, _ = shop
    with running() as console, running() as elsewhere:
        moved = f"{console.url}/redirect/{urllib.parse.quote(elsewhere.url, safe='')}"
        code, _, error = automigrate(tmp_path / "f.json", "--console", moved, "--token", "t0k")
        assert elsewhere.seen == []
    assert code == 1
    assert error == (
        f"cannot read the flags of shop: the console at {moved}/api/targets/shop/flags "
        f"redirected to http://127.0.0.1:{elsewhere.server_address[1]}, another origin: the "
        "token is not sent there (give the console's own URL)"
    )
    assert not orders_exists(target_db)


# --- several instances starting at once ----------------------------------------------------------
def test_instances_starting_at_once_apply_exactly_once(shop, settings, tmp_path):
    from tests.worker import database_url

    target_db, target = shop
    set_flags(target, MIGRATION_LOCK_TIMEOUT=20)
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}},
        "DJANGO_SETTINGS_MODULE": "opsconsole.settings",
        "DATABASE_URL": database_url(settings.DATABASES["default"]),
    }
    command = [sys.executable, "manage.py", "ops", "automigrate", "--target", "shop"]
    command += ["--cache-file", str(tmp_path / "shared.json"), "--backoff", "0"]
    processes = [
        subprocess.Popen(
            [*command, "--app", f"instance-{n}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in range(4)
    ]
    outputs = [p.communicate(timeout=90) for p in processes]
    results = [
        (p.returncode, out.decode(), err.decode())
        for p, (out, err) in zip(processes, outputs, strict=True)
    ]

    assert [code for code, _, _ in results] == [0, 0, 0, 0], results
    applies = Operation.objects.filter(kind=OperationKind.APPLY, status=OperationStatus.SUCCEEDED)
    assert applies.count() == 1
    winner = applies.get()
    assert not Operation.objects.exclude(pk=winner.pk).filter(status="succeeded").exists()
    assert sum(f"(operation #{winner.pk})" in out for _, out, _ in results) == 1
    others = [out for _, out, _ in results if f"(operation #{winner.pk})" not in out]
    # An instance that started after the winner finished finds nothing pending at all.
    assert all(
        f"already applied by operation #{winner.pk}" in out or "nothing to apply on shop" in out
        for out in others
    ), others
    assert books(target_db) == [
        "001_create_users.sql",
        "002_add_email.sql",
        "003_create_orders.sql",
    ]
