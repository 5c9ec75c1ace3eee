"""Running an operation: send it to a worker, claim it, beat, run it, finish it.

Process state owned here: the heartbeat thread of each operation running in this process
(``_heartbeat``), with its own connection to the console's database.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import connection as console_connection
from django.db import transaction
from django.utils import timezone

from migrations_ops import engine, plain_rows
from migrations_ops.actors import Actor
from migrations_ops.models import (
    ACTIVE_STATUSES,
    LockState,
    MigrationScript,
    Operation,
    OperationKind,
    OperationStatus,
    Target,
)
from migrations_ops.services.audit import record_audit_event
from migrations_ops.services.observations import observe_lock, open_target, read_target_status
from migrations_ops.services.scripts import _no_scripts_hint, engine_scripts, script_summaries

logger = logging.getLogger(__name__)


def send_operation(operation_id: int) -> bool:
    """Hand the operation to Celery. If the broker is down the row stays queued: the outbox
    keeps the request, so a broker outage delays work and never loses it (the sweeper sends it
    again, see ``sweep_operations``). Returns whether the task was sent."""
    from migrations_ops.tasks import execute_operation_task

    try:
        execute_operation_task.delay(operation_id)
    except Exception as error:  # the broker's client raises many kinds
        logger.warning("operation %s stays queued: broker unavailable: %s", operation_id, error)
        _append_log(operation_id, f"could not reach the task broker ({error}); still queued")
        operation = Operation.objects.select_related("target").get(pk=operation_id)
        record_audit_event(
            Actor.worker("outbox"),
            "operation.send_failed",
            target=operation.target,
            operation=operation,
            details={"error": str(error)},
        )
        return False
    return True


def execute_operation(operation_id: int, *, worker: str = "") -> Operation | None:
    """Run a queued operation. The claim is a conditional update, so a duplicated or
    redelivered task finds the operation already claimed and does nothing. While the runner
    works, a heartbeat keeps ``heartbeat_at`` fresh for the sweeper."""
    operation = _claim(operation_id, worker)
    if operation is None:
        logger.info("operation %s was not queued any more; nothing to do", operation_id)
        return None
    log = [_log_line(f"claimed by {worker or 'in-process'}")]
    try:
        with _heartbeat(operation_id, operation.log, log):
            result = RUNNERS[operation.kind](operation, log)
    except SoftTimeLimitExceeded:
        return _finish(operation, log, OperationStatus.FAILED, error=_time_limit_error(operation))
    except engine.EngineError as error:
        # A failed migration still reports the statements that ran before the failure.
        report = getattr(error, "report", None)
        result = report.as_dict() if report is not None else None
        return _finish(operation, log, OperationStatus.FAILED, error=str(error), result=result)
    except Exception as error:
        logger.exception("operation %s failed unexpectedly", operation_id)
        return _finish(
            operation, log, OperationStatus.FAILED, error=f"internal error: {type(error).__name__}"
        )
    return _finish(operation, log, OperationStatus.SUCCEEDED, result=result)


def _claim(operation_id: int, worker: str) -> Operation | None:
    """Mark a queued operation running and load it with its target; None if it was not queued.

    One UPDATE ... RETURNING, joined to the target's row on PostgreSQL (SQLite cannot put an
    UPDATE in a WITH: the target follows by its key), in plain SQL (``plain_rows``): through
    the ORM they cost an UPDATE, a SELECT joining the target, and the query compiler's work on
    both -- more than a small migration's whole run on its target (bench/rollback_overhead.py)."""
    quoted = plain_rows.quoted
    column = {name: quoted(Operation, name) for name in _CLAIMED_FIELDS}
    now = Operation._meta.get_field("started_at").get_db_prep_value(
        timezone.now(), console_connection
    )
    query = (
        f"UPDATE {quoted(Operation)} SET {column['status']} = %s, "  # noqa: S608 (quoted names)
        f"{column['started_at']} = %s, {column['heartbeat_at']} = %s, {column['worker']} = %s "
        f"WHERE {column['id']} = %s AND {column['status']} = %s "
        f"RETURNING {plain_rows.columns(Operation)}"
    )
    joined = console_connection.vendor == "postgresql"
    if joined:
        query = (
            f"WITH claimed AS ({query}) SELECT claimed.*, {plain_rows.columns(Target, 'target')} "  # noqa: S608 (quoted names)
            f"FROM claimed JOIN {quoted(Target)} AS target "
            f"ON target.{quoted(Target, 'id')} = claimed.{quoted(Operation, 'target')}"
        )
    with console_connection.cursor() as cursor:
        cursor.execute(
            query,
            [OperationStatus.RUNNING, now, now, worker, operation_id, OperationStatus.QUEUED],
        )
        claimed = cursor.fetchone()
    if claimed is None:
        return None
    count = len(Operation._meta.concrete_fields)
    operation = plain_rows.instance(Operation, claimed[:count])
    if joined:
        operation.target = plain_rows.instance(Target, claimed[count:])
    else:
        (operation.target,) = plain_rows.instances(
            Target, f"{quoted(Target, 'id')} = %s", [operation.target_id]
        )
    return operation


_CLAIMED_FIELDS = ("id", "status", "started_at", "heartbeat_at", "worker")


@contextlib.contextmanager
def _heartbeat(operation_id: int, claimed_log: str, log: list[str]):
    """While the body runs, refresh the operation's ``heartbeat_at`` every
    OPERATION_HEARTBEAT_SECONDS from a thread of its own, with its own connection to the
    console's database (closed when it stops): a worker that dies stops beating, which is how
    the sweeper tells it from one still at work. Each beat also writes the log so far, so the
    operation's page shows it grow."""
    stop = threading.Event()
    thread = threading.Thread(
        target=_beat,
        args=(operation_id, stop, settings.OPERATION_HEARTBEAT_SECONDS, claimed_log, log),
        name=f"heartbeat-operation-{operation_id}",
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _beat(
    operation_id: int, stop: threading.Event, interval: float, claimed_log: str, log: list[str]
) -> None:
    try:
        while not stop.wait(interval):
            try:
                with transaction.atomic():
                    # Never waits for the row: one locked by a writer (the operation finishing,
                    # the sweeper) skips this beat, so stopping the heartbeat cannot deadlock.
                    status = (
                        Operation.objects.select_for_update(skip_locked=True)
                        .filter(pk=operation_id)
                        .values_list("status", flat=True)
                        .first()
                    )
                    if status == OperationStatus.RUNNING:
                        Operation.objects.filter(pk=operation_id).update(
                            heartbeat_at=timezone.now(), log=claimed_log + "".join(list(log))
                        )
            except Exception as error:  # the console's database away for a moment: next beat
                logger.warning("operation %s: heartbeat not recorded: %s", operation_id, error)
                console_connection.close()
                continue
            if status is not None and status != OperationStatus.RUNNING:
                return  # finished, or marked lost: nothing left to keep alive
    finally:
        console_connection.close()


def _time_limit_error(operation: Operation) -> str:
    """The soft time limit stopped the runner (Celery raised it in the task): what that left."""
    error = (
        f"stopped by the time limit: still running after {settings.OPERATION_SOFT_TIME_LIMIT} s "
        "(OPERATION_SOFT_TIME_LIMIT); its connection to the target was closed, so the target "
        "rolls its open transaction back (statements run outside a transaction stay done)"
    )
    if operation.kind in LOCK_TAKING_KINDS:
        state, note = _lock_left_by(operation)
        if state in ("ours", "maybe_ours", "unknown"):
            error += f"; {note}"
    return error


def _run_force_unlock(operation: Operation, log: list[str]) -> dict:
    target = operation.target
    convention = engine.get_convention(target.convention)
    with open_target(target) as connection:
        log.append(_log_line(f"connected to {target.name} ({target.dialect})"))
        before, after = convention.release_lock(
            connection, expected_rows=operation.params.get("expected_rows")
        )
    log.append(
        _log_line(f"released the lock; it was: {engine.conventions.describe_rows(before.rows)}")
    )
    observe_lock(target, after)
    return {"before": before.as_dict(), "after": after.as_dict()}


def _finish(
    operation: Operation,
    log: list[str],
    status: str,
    *,
    result: dict | None = None,
    error: str = "",
) -> Operation:
    finished_at = timezone.now()
    log.append(_log_line(f"{status}{': ' + error if error else ''}"))
    claimed_log = operation.log  # as claimed: the heartbeat may have written part of ``log``
    with transaction.atomic():
        operation.status = status
        operation.finished_at = finished_at
        operation.result = result or {}
        operation.error = error
        operation.log = claimed_log + "".join(log)
        # The operation as claimed, with its target, is all the rest needs: no read back. The
        # UPDATE locks the row until the commit, so the heartbeat skips its beats meanwhile.
        finished = ("status", "finished_at", "result", "error", "log")
        plain_rows.update(
            Operation,
            {name: getattr(operation, name) for name in finished},
            f"{plain_rows.quoted(Operation, 'id')} = %s",
            [operation.pk],
        )
        if operation.lock_after is not None:
            observe_lock(operation.target, operation.lock_after)
        record_audit_event(
            Actor.worker(operation.worker),
            f"operation.{status}",
            target=operation.target,
            operation=operation,
            details={"kind": operation.kind, "error": error, "result": result or {}},
        )
        _note_on_incidents(operation)
    return operation


def _note_on_incidents(operation: Operation) -> None:
    """Put the operation on the open incidents' timelines. A failure there is logged and
    never fails or undoes the operation (the savepoint keeps the rest of the transaction)."""
    try:
        # incidents builds on this module
        from incidents.selectors import incidents_to_note
        from incidents.services import record_operation

        incidents = incidents_to_note(operation)
        if not incidents:  # as most of the time: spare the savepoint
            return
        with transaction.atomic():
            record_operation(operation, incidents)
    except Exception:
        logger.exception("could not note operation #%s on incident timelines", operation.pk)


def _log_line(text: str) -> str:
    return f"{timezone.now():%Y-%m-%d %H:%M:%S.%f}"[:-3] + f"Z {text}\n"


def _append_log(operation_id: int, text: str) -> None:
    with transaction.atomic():
        operation = Operation.objects.select_for_update().get(pk=operation_id)
        operation.log += _log_line(text)
        operation.save(update_fields=["log"])


# The kinds that take the target's migration lock (engine.run_migrations), dry runs included.
LOCK_TAKING_KINDS = (OperationKind.APPLY, OperationKind.ROLLBACK)


def _lock_left_by(operation: Operation) -> tuple[str, str]:
    """Whether the target's migration lock is still held by this operation, which will never
    release it now (its worker died, or the time limit stopped it)."""
    target = operation.target
    status = read_target_status(target, include_applied=False)
    if status.error:
        return "unknown", (
            f"could not read the migration lock of {target.name} ({status.error}): check "
            "whether this operation left it held"
        )
    observation = status.observation
    if not observation.held:
        return "free", f"the migration lock of {target.name} is free"
    holder = lock_holder(operation)
    release = (
        "force-release it (admin: Force-release migration lock, with 'release a fresh lock'; "
        f"CLI: ops unlock --target {target.name} --reason TEXT --force)"
    )
    if observation.holder == holder or any(
        value == holder for row in observation.rows for value in row.values()
    ):
        return "ours", (
            f"the migration lock of {target.name} is still held by this operation ({holder}) "
            f"and nothing will release it: {release}"
        )
    if not observation.holder:
        rows = engine.conventions.describe_rows(observation.rows)
        return "maybe_ours", (
            f"the migration lock of {target.name} is held and its table names no holder "
            f"({rows}): it may be this operation's; unless another migration is running, "
            f"{release}"
        )
    return "other", (
        f"the migration lock of {target.name} is held by {observation.holder}, not by this "
        "operation"
    )


def lock_holder(operation: Operation) -> str:
    """What an operation writes as the holder of the target's migration lock (where the
    lock table keeps one)."""
    return f"opsconsole operation #{operation.pk} ({operation.requested_by_name})"


def _run_settings(operation: Operation) -> engine.RunSettings:
    target = operation.target
    return engine.RunSettings(
        holder=lock_holder(operation),
        # The auto-migrator makes each retry an operation of its own, with the flags it read.
        lock_wait_seconds=operation.params.get("lock_wait_seconds", target.lock_timeout_seconds),
        max_retries=operation.params.get("lock_retries", target.max_retries),
        statement_timeout_seconds=target.statement_timeout_seconds,
        dry_run=bool(operation.params.get("dry_run")),
        allow_non_transactional=bool(operation.params.get("non_transactional")),
    )


def _logger(log: list[str]):
    return lambda text: log.append(_log_line(text))


def _run_apply(operation: Operation, log: list[str]) -> dict:
    target = operation.target
    scripts = script_summaries(target)
    versions, to_version = operation.params["versions"], operation.params.get("to_version")
    by_version = {script.version: script for script in engine_scripts(target, versions=versions)}
    if not all(version in by_version for version in versions):
        raise engine.EngineError(
            "the imported scripts changed since the request; look again and re-request"
        )

    def check_books(applied: list[engine.AppliedMigration]) -> None:
        pending = engine.plan.pending(applied, scripts, to_version)
        if [script.version for script in pending] != versions:
            raise engine.EngineError(
                "the books changed since the request: pending now "
                f"{', '.join(s.filename for s in pending) or 'nothing'}; look again and re-request"
            )

    chosen = [by_version[version] for version in versions]
    steps = [engine.Step("up", script, script.filename) for script in chosen]
    return _run_steps(operation, steps, check_books, log)


def _run_rollback(operation: Operation, log: list[str]) -> dict:
    params = operation.params
    # The script chosen at the request (a target may keep hundreds).
    found = engine_scripts(operation.target, versions=[params["version"]])
    if not found:
        raise engine.EngineError(
            f"the script of {params['migration']} is no longer imported; look again and re-request"
        )

    def check_books(applied: list[engine.AppliedMigration]) -> None:
        try:
            entry, _ = engine.plan.rollback_choice(
                applied, found, params["version"], out_of_order=params.get("out_of_order", False)
            )
        except engine.plan.PlanError as error:
            raise engine.EngineError(f"the books changed since the request: {error}") from None
        if entry.name != params["book_name"]:
            raise engine.EngineError(
                f"the books changed since the request ({entry.name} instead of "
                f"{params['book_name']}); look again and re-request"
            )

    steps = [engine.Step("down", found[0], params["book_name"])]
    return _run_steps(operation, steps, check_books, log)


def _run_steps(operation: Operation, steps, check_books, log: list[str]) -> dict:
    """Run under the lock, where the books are checked again before any SQL runs."""
    target = operation.target
    convention = engine.get_convention(target.convention)
    with open_target(target) as connection:
        report = engine.run_migrations(
            connection,
            convention,
            steps,
            _run_settings(operation),
            _logger(log),
            check_books=check_books,
        )
        lock = report.lock_after
        if lock is None:  # the release failed: see what it left
            lock = convention.read_lock(connection, check_tables=False)
    operation.lock_after = lock
    return report.as_dict()


def _run_mark(operation: Operation, log: list[str]) -> dict:
    target = operation.target
    convention = engine.get_convention(target.convention)
    name = operation.params["book_name"]
    marking_applied = operation.kind == OperationKind.MARK_APPLIED
    with open_target(target) as connection:
        before = [m.as_dict() for m in convention.read_applied(connection)]
        changes = engine.mark_books(
            connection,
            convention,
            applied=[name] if marking_applied else [],
            removed=[] if marking_applied else [name],
        )
        after = [m.as_dict() for m in convention.read_applied(connection)]
    for change in changes:
        log.append(_log_line(change))
    return {"changes": changes, "before": before, "after": after}


def _run_verify(operation: Operation, log: list[str]) -> dict:
    target = operation.target
    convention = engine.get_convention(target.convention)
    drifted = {
        row.filename: drift_description(row) for row in target.scripts.exclude(drift_checksum="")
    }
    scripts = script_summaries(target)
    with open_target(target) as connection:
        applied = convention.read_applied(connection)
        lock = convention.read_lock(connection)
        invalid = engine.invalid_indexes(connection)
    observation = observe_lock(target, lock)
    if scripts:
        problems = engine.plan.verify_books(applied, scripts, drifted=drifted)
    else:
        problems = [engine.plan.Problem("no_scripts", _no_scripts_hint(target))]
    stale = engine.plan.lock_problem(
        bool(observation.held), observation.since, timezone.now(), target.lock_timeout
    )
    problems += [stale] if stale else []
    problems += [
        engine.plan.Problem(
            "invalid_index",
            f"index {index.name} on {index.table} is INVALID (left by a failed concurrent "
            f"build): drop and rebuild it",
        )
        for index in invalid
    ]
    for problem in problems:
        log.append(_log_line(f"{problem.code}: {problem.message}"))
    log.append(_log_line(f"verify: {len(problems)} problem(s)"))
    return {
        "ok": not problems,
        "problems": [problem.as_dict() for problem in problems],
        "applied": len(applied),
        "scripts": len(scripts),
    }


def drift_description(row: MigrationScript) -> str:
    return (
        f"the folder's SQL (checksum {row.drift_checksum[:12]}) differs from the SQL imported "
        f"(checksum {row.checksum[:12]}), seen {row.drift_detected_at:%Y-%m-%d %H:%M} UTC"
    )


def _run_cleanup(operation: Operation, log: list[str]) -> dict:
    target = operation.target
    convention = engine.get_convention(target.convention)
    with open_target(target) as connection:
        lock = convention.read_lock(connection)
        observation = observe_lock(target, lock)
        stale = observation.state(timezone.now(), target.lock_timeout) == LockState.STALE
        changes = convention.repair_lock_table(connection, release=stale, expected_rows=lock.rows)
        after = convention.read_lock(connection)
    observe_lock(target, after)
    if lock.held and not stale:
        changes.append("the lock is held but not stale: left alone")
    for change in changes or ["nothing to clean up"]:
        log.append(_log_line(change))
    return {"changes": changes, "before": lock.as_dict(), "after": after.as_dict()}


RUNNERS = {
    OperationKind.FORCE_UNLOCK: _run_force_unlock,
    OperationKind.APPLY: _run_apply,
    OperationKind.ROLLBACK: _run_rollback,
    OperationKind.MARK_APPLIED: _run_mark,
    OperationKind.MARK_ROLLED_BACK: _run_mark,
    OperationKind.VERIFY: _run_verify,
    OperationKind.CLEANUP: _run_cleanup,
}


# How often a process waiting for an operation to end (the auto-migrator's) looks again.
AUTO_MIGRATE_POLL_SECONDS = 0.2


def run_in_this_process(operation: Operation, *, worker: str) -> Operation:
    """Run a queued operation in this process (the auto-migrator, a drill: both wait for their
    own operation); when a worker claimed it first (a broker is configured), wait for it.
    Without a broker the request's commit has run it here already: the claim then finds it
    taken and this only reads it back."""
    execute_operation(operation.pk, worker=f"{worker}@{socket.gethostname()}")
    _wait_for(operation.pk, settings.OPERATION_SOFT_TIME_LIMIT + 60)
    operation.refresh_from_db()
    return operation


def _wait_for(operation_id: int, seconds: float) -> None:
    deadline = time.monotonic() + max(0.0, seconds)
    query = Operation.objects.filter(pk=operation_id, status__in=ACTIVE_STATUSES)
    while query.exists() and time.monotonic() < deadline:
        time.sleep(AUTO_MIGRATE_POLL_SECONDS)
