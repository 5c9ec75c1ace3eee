"""GET /metrics: what Prometheus scrapes, who may scrape it, and the alert rules built on it."""

import datetime as dt
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from incidents import services as incident_services
from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.models import (
    ApiToken,
    Door,
    FlagStage,
    Operation,
    OperationKind,
    OperationStatus,
    Target,
)
from tests.factories import IncidentFactory, TargetFactory, UserFactory
from tests.scripts_folder import EMAIL, ORDERS, USERS, apply_directly, write_folder

pytestmark = pytest.mark.django_db

METRICS = "/metrics"
DOCS = Path(__file__).resolve().parents[2] / "docs"
OPERATOR = Actor.shell_operator()
PROMTOOL = shutil.which("promtool")  # Prometheus's own checker, when installed


def scrape(client, **headers) -> dict[str, dict[tuple, float]]:
    """``{sample name: {sorted label pairs: value}}`` as Prometheus's own parser reads them."""
    response = client.get(METRICS, **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples[name][tuple(sorted(labels.items()))]


def targets_in(samples, name) -> set[str]:
    return {dict(labels).get("target") for labels in samples.get(name, {})}


def staff(client):
    client.force_login(UserFactory(permissions=["migrations_ops.view_target"]))
    return client


def make_token(*targets) -> str:
    raw = secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        name="shop-api",
        prefix=raw[:8],
        token_hash=services.hash_api_token(raw),
        created_by_name="tests",
    )
    token.targets.set(targets)
    return raw


def finished_operation(target, kind, status, seconds, *, result=None, params=None):
    started = timezone.now() - dt.timedelta(minutes=5)
    return Operation.objects.create(
        target=target,
        kind=kind,
        status=status,
        requested_by_name="tests",
        door=Door.CLI,
        reason="tests",
        params=params or {},
        started_at=started,
        finished_at=started + dt.timedelta(seconds=seconds),
        result=result or {},
    )


@pytest.fixture
def fleet(pg_target, sqlite_target, tmp_path):
    """``orders`` (PostgreSQL, its lock held 45 s, one migration pending), ``billing``
    (SQLite, lock free) and ``search`` (never read), each observed as an engineer would."""
    pg_target.create_runbook_books(lock_age=dt.timedelta(seconds=45))
    apply_directly(pg_target, USERS, EMAIL)
    orders = TargetFactory(db=pg_target, name="orders")
    services.import_scripts(
        actor=OPERATOR, target=orders, directory=write_folder(tmp_path / "m", USERS, EMAIL, ORDERS)
    )
    verify = services.request_verify(actor=OPERATOR, target=orders)
    services.execute_operation(verify.pk, worker="test-worker")
    services.read_target_status(orders)

    sqlite_target.create_runbook_books()
    billing = TargetFactory(db=sqlite_target, name="billing", auto_migrate=False, max_retries=0)
    services.read_target_status(billing)

    search = TargetFactory(name="search", flag_stage=FlagStage.DISABLED)
    return {"orders": orders, "billing": billing, "search": search}


def test_lock_pending_and_flags_as_last_observed(client, fleet):
    samples = scrape(staff(client))

    held = value(samples, "opsconsole_lock_held_seconds", target="orders")
    assert 45 <= held < 75
    assert value(samples, "opsconsole_lock_held_seconds", target="billing") == 0
    assert "search" not in targets_in(samples, "opsconsole_lock_held_seconds")  # never read
    assert value(samples, "opsconsole_lock_observation_age_seconds", target="orders") < 30
    assert value(samples, "opsconsole_lock_read_failed", target="orders") == 0
    assert value(samples, "opsconsole_lock_read_failed", target="search") == 1

    assert value(samples, "opsconsole_migration_scripts", target="orders") == 3
    assert value(samples, "opsconsole_pending_migrations", target="orders") == 1  # 003
    assert "billing" not in targets_in(samples, "opsconsole_pending_migrations")  # no verify yet
    assert value(samples, "opsconsole_target_info", target="orders", environment="staging") == 1

    assert value(samples, "opsconsole_flag", target="orders", flag="AUTO_MIGRATE") == 1
    assert value(samples, "opsconsole_flag", target="billing", flag="AUTO_MIGRATE") == 0
    assert value(samples, "opsconsole_flag", target="billing", flag="MIGRATION_MAX_RETRIES") == 0
    assert value(samples, "opsconsole_flag", target="orders", flag="MIGRATION_LOCK_TIMEOUT") == 60
    assert value(samples, "opsconsole_flag_stage", target="search", stage="disabled") == 1
    assert value(samples, "opsconsole_flag_stage", target="search", stage="normal") == 0


def test_a_failed_lock_read_shows_and_the_held_time_disappears(client, fleet):
    orders = fleet["orders"]
    orders.schema = "no_such_schema"
    orders.connection_url = "postgresql://postgres@127.0.0.1:1/nowhere"
    services.read_target_status(orders)

    samples = scrape(staff(client))

    assert value(samples, "opsconsole_lock_read_failed", target="orders") == 1
    assert "orders" not in targets_in(samples, "opsconsole_lock_held_seconds")


def test_operations_counted_by_kind_and_status_with_durations(client, fleet):
    orders = fleet["orders"]
    finished_operation(orders, "apply", "succeeded", 2, result={"lock_attempts": 1})
    finished_operation(orders, "apply", "failed", 40, result={"lock_attempts": 3})
    finished_operation(orders, "apply", "failed", 0.2, params={"dry_run": True})
    finished_operation(orders, "rollback", "succeeded", 0.5, result={"lock_attempts": 2})
    Operation.objects.create(
        target=orders, kind="apply", requested_by_name="t", door=Door.CLI, reason="t"
    )

    samples = scrape(staff(client))

    def finished(kind, status, dry_run="false"):
        return value(
            samples,
            "opsconsole_operations_finished_total",
            target="orders",
            kind=kind,
            status=status,
            dry_run=dry_run,
        )

    assert finished("apply", "succeeded") == 1
    assert finished("apply", "failed") == 1
    assert finished("apply", "failed", dry_run="true") == 1
    assert finished("rollback", "succeeded") == 1
    assert finished("verify", "succeeded") == 1  # the fixture's real verify
    assert finished("rollback", "failed") == 0  # present before the first failure
    assert value(samples, "opsconsole_operations_finished_total", target="billing", kind="apply",
                 status="lost", dry_run="false") == 0  # fmt: skip

    def retried(kind):
        return value(
            samples,
            "opsconsole_operations_lock_retried_total",
            target="orders",
            kind=kind,
            dry_run="false",
        )

    assert retried("apply") == 1
    assert retried("rollback") == 1
    assert (
        value(
            samples, "opsconsole_operations_active", target="orders", kind="apply", status="queued"
        )
        == 1
    )

    def bucket(kind, le):
        return value(
            samples,
            "opsconsole_operation_duration_seconds_bucket",
            target="orders",
            kind=kind,
            le=le,
        )

    assert bucket("apply", "1.0") == 1  # the 0.2 s dry run
    assert bucket("apply", "5.0") == 2
    assert bucket("apply", "30.0") == 2
    assert bucket("apply", "60.0") == 3
    assert bucket("apply", "+Inf") == 3
    duration_count = "opsconsole_operation_duration_seconds_count"
    assert value(samples, duration_count, target="orders", kind="apply") == 3
    total = value(
        samples, "opsconsole_operation_duration_seconds_sum", target="orders", kind="apply"
    )
    assert total == pytest.approx(42.2)
    assert bucket("rollback", "1.0") == 1


def test_open_incidents_by_severity_without_drills_or_closed_ones(client, fleet):
    incident_services.open_incident(
        actor=OPERATOR,
        title="orders migration failed",
        scenario="migration_failure",
        severity="sev1",
        targets=[fleet["orders"]],
    )
    IncidentFactory(severity="sev1", is_drill=True)
    IncidentFactory(severity="sev2", status="resolved")

    samples = scrape(staff(client))

    assert value(samples, "opsconsole_open_incidents", severity="sev1") == 1
    assert value(samples, "opsconsole_open_incidents", severity="sev2") == 0
    assert value(samples, "opsconsole_open_incidents", severity="sev4") == 0


def test_a_token_sees_only_its_targets(client, fleet):
    orders, billing = fleet["orders"], fleet["billing"]
    finished_operation(billing, "apply", "failed", 3)
    incident_services.open_incident(
        actor=OPERATOR,
        title="orders lock stuck",
        scenario="concurrent_conflict",
        severity="sev2",
        targets=[orders],
    )
    incident_services.open_incident(
        actor=OPERATOR,
        title="billing down",
        scenario="production_emergency",
        severity="sev1",
        targets=[billing],
    )
    raw = make_token(orders)

    samples = scrape(client, HTTP_AUTHORIZATION=f"Bearer {raw}")

    for name in samples:
        if name.startswith("opsconsole_") and name != "opsconsole_open_incidents":
            assert targets_in(samples, name) <= {"orders"}, name
    assert value(samples, "opsconsole_lock_held_seconds", target="orders") >= 45
    assert value(samples, "opsconsole_open_incidents", severity="sev2") == 1
    assert value(samples, "opsconsole_open_incidents", severity="sev1") == 0  # billing's


def error_of(response, status, code):
    assert response.status_code == status
    body = response.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]["message"]


def test_anonymous_scrapes_get_a_json_401(client, fleet):
    error_of(client.get(METRICS), 401, "not_authenticated")


def test_unknown_or_revoked_tokens_get_401(client, fleet):
    raw = make_token(fleet["orders"])
    ApiToken.objects.update(revoked_at=timezone.now())

    error_of(client.get(METRICS, HTTP_AUTHORIZATION=f"Bearer {raw}"), 401, "invalid_token")
    response = client.get(METRICS, HTTP_AUTHORIZATION="Basic dXNlcjpwdw==")
    error_of(response, 401, "not_authenticated")


def test_staff_without_the_view_permission_get_403(client, fleet):
    client.force_login(UserFactory())
    error_of(client.get(METRICS), 403, "forbidden")


def test_only_get_is_allowed(client, fleet):
    response = staff(client).post(METRICS)
    error_of(response, 405, "method_not_allowed")
    assert response["Allow"] == "GET"


def test_openmetrics_is_served_to_who_asks_for_it(client, fleet):
    response = staff(client).get(METRICS, HTTP_ACCEPT="application/openmetrics-text; version=1.0.0")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.decode().endswith("# EOF\n")


def busy_targets(count: int, start: int) -> None:
    for index in range(start, start + count):
        target = TargetFactory(name=f"busy-{index}")
        services.observe_lock(target, None, error="connection refused")
        for kind, status in [("apply", "succeeded"), ("rollback", "failed"), ("verify", "lost")]:
            finished_operation(target, kind, status, index)
        IncidentFactory(severity="sev3").affected_targets.add(target)


def test_queries_per_scrape_do_not_grow_with_the_fleet(client, django_assert_max_num_queries):
    staff(client).get(METRICS)  # the session and permissions are cached from here on
    busy_targets(1, start=0)
    with CaptureQueriesContext(connection) as one_target:
        scrape(client)
    busy_targets(20, start=1)
    with django_assert_max_num_queries(len(one_target.captured_queries)):
        samples = scrape(client)
    assert len(targets_in(samples, "opsconsole_lock_read_failed")) == 21
    assert value(samples, "opsconsole_open_incidents", severity="sev3") == 21


def test_queries_per_token_scrape_do_not_grow_with_the_fleet(client, django_assert_max_num_queries):
    busy_targets(2, start=0)
    small_scope = make_token(*Target.objects.all())
    with CaptureQueriesContext(connection) as small:
        scrape(client, HTTP_AUTHORIZATION=f"Bearer {small_scope}")
    busy_targets(20, start=2)
    large_scope = make_token(*Target.objects.all())
    with django_assert_max_num_queries(len(small.captured_queries)):
        samples = scrape(client, HTTP_AUTHORIZATION=f"Bearer {large_scope}")
    assert len(targets_in(samples, "opsconsole_flag")) == 22


# --- the workers ---------------------------------------------------------------------------------
@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_workers_alive_is_zero_until_a_worker_starts(client, own_queue, start_worker):
    from opsconsole.celery import app

    staff(client)
    app.conf.task_always_eager = True  # tasks in-process: no worker to miss, no false alarm
    assert "opsconsole_workers_alive" not in scrape(client)
    app.conf.task_always_eager = False  # sent to own_queue, where no worker listens yet
    samples = scrape(client)
    assert value(samples, "opsconsole_workers_alive") == 0
    assert "opsconsole_worker_last_seen_seconds" not in samples  # none ever seen

    start_worker()
    deadline = time.monotonic() + 20
    while value(samples := scrape(client), "opsconsole_workers_alive") != 1:
        assert time.monotonic() < deadline, "the worker never showed as alive"
        time.sleep(0.2)

    assert 0 <= value(samples, "opsconsole_worker_last_seen_seconds") < 5


# --- the documented alert rules -----------------------------------------------------------------
def rule_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bopsconsole_[a-z_]+", expr))


def test_alert_rules_parse_and_use_only_exposed_series(client, fleet, own_queue):
    """Tasks sent to workers (own_queue): the worker series are exposed too."""
    finished_operation(fleet["orders"], OperationKind.APPLY, OperationStatus.SUCCEEDED, 1)
    exposed = set(scrape(staff(client)))
    rules = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text())

    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"], name
        used = rule_metric_names(rule["expr"])
        assert used, name
        assert used <= exposed, f"{name} uses {used - exposed}, which /metrics does not expose"


def test_alert_rules_carry_the_runbook_thresholds():
    rules = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}

    failure = alerts["MigrationFailureRateHigh"]
    assert failure["labels"]["severity"] == "critical"
    assert re.search(r">\s*0\.1\b", failure["expr"])
    lock = alerts["MigrationLockHeldTooLong"]
    assert lock["labels"]["severity"] == "critical"
    assert re.search(r"opsconsole_lock_held_seconds\s*>\s*30\b", lock["expr"])
    retry = alerts["MigrationRetryRateHigh"]
    assert retry["labels"]["severity"] == "warning"
    assert re.search(r">\s*0\.5\b", retry["expr"])


def test_the_documented_scrape_config_parses_and_sends_a_bearer_token():
    text = (DOCS / "alerts.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    scrape_configs = [
        config
        for block in blocks
        for config in (yaml.safe_load(block) or {}).get("scrape_configs", [])
    ]
    assert scrape_configs
    config = scrape_configs[0]
    assert config["metrics_path"] == "/metrics"
    assert config["authorization"]["type"] == "Bearer"
    assert config["authorization"]["credentials_file"]


def series_selector(name: str, labels: tuple) -> str:
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in labels) + "}"


def alert_names_of(rules: dict) -> list[str]:
    return [rule["alert"] for group in rules["groups"] for rule in group["rules"]]


@pytest.mark.skipif(PROMTOOL is None, reason="needs Prometheus's promtool")
def test_the_rules_fire_on_what_metrics_exposes(client, fleet, tmp_path):
    """Two real scrapes, a minute apart for Prometheus: between them an apply failed and one
    succeeded on ``orders``, both after lock retries; its lock has been held 45 s. Prometheus's
    own rule tester then says which alerts fire."""
    before = scrape(staff(client))
    orders = fleet["orders"]
    finished_operation(orders, "apply", "failed", 3, result={"lock_attempts": 2})
    finished_operation(orders, "apply", "succeeded", 3, result={"lock_attempts": 2})
    after = scrape(client)

    input_series = [
        {
            "series": series_selector(name, labels),
            "values": " ".join(str(v) for v in [before.get(name, {}).get(labels, 0)] + [now] * 3),
        }
        for name, series in after.items()
        for labels, now in series.items()
    ]
    rules = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")  # templates: promtool check rules covers them
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    firing = {
        "MigrationLockHeldTooLong": "critical",
        "MigrationFailureRateHigh": "critical",
        "MigrationRetryRateHigh": "warning",
    }
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series,
                "alert_rule_test": [
                    {
                        "eval_time": "3m",
                        "alertname": name,
                        "exp_alerts": [
                            {"exp_labels": {"severity": firing[name], "target": "orders"}}
                        ]
                        if name in firing
                        else [],
                    }
                    for name in alert_names_of(rules)
                ],
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))

    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(DOCS / "prometheus-alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
