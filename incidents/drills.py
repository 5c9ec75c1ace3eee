"""The runbook's drills, for real on a sandbox target: the fault each one makes, and the
procedure it then follows through the same services an on-call engineer uses.

- Lock release (monthly): a separate process takes the target's migration lock the way its
  convention's own migrator does (``Convention.try_take_lock``) and is killed with SIGKILL, so
  the lock stays behind with a holder that is gone. Detected by the console's status read,
  mitigated by a force-unlock operation, recovered when a verify finds the target clean.
- Rollback simulation (quarterly): the drill's own migration (``drill_scripts/``: a table and an
  index) is imported and applied as "the bad migration". Detected by the status read,
  mitigated by an emergency disable of auto-migration and a rollback operation, recovered when
  a verify finds the books clean, the schema is as it was before and the flags are back.

Every step is timed from the moment the fault was made, recorded on a drill incident
(``Incident.is_drill``: kept out of the real incident figures) and on the ``DrillRun``. A
failure half-way still cleans up what the drill made.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from incidents import selectors
from incidents import services as incident_services
from incidents.models import (
    ChecklistKey,
    CheckResult,
    DrillKind,
    DrillRun,
    DrillRunStatus,
    Incident,
    IncidentStatus,
    Scenario,
    Severity,
)
from migrations_ops import engine
from migrations_ops import selectors as ops_selectors
from migrations_ops import services as ops
from migrations_ops.actors import Actor
from migrations_ops.models import Door, FlagStage, Operation, OperationKind, OperationStatus, Target

DRILL_SCRIPTS = Path(__file__).with_name("drill_scripts")
# How long the lock-taking process may take to connect and take the lock.
FAULT_READY_SECONDS = 30
# The runbook's scenario each drill rehearses: its objectives score the drill.
DRILL_SCENARIOS = {
    DrillKind.LOCK_RELEASE: Scenario.CONCURRENT_CONFLICT,
    DrillKind.ROLLBACK: Scenario.MIGRATION_FAILURE,
}
ROOT_CAUSE = "drill"
NO_ACTION_ITEMS_REASON = "drill"

# Run as ``python -c`` from the project folder: the engine imports nothing from Django. The
# connection URL comes through the environment, never the command line (``ps`` shows that).
_TAKE_LOCK_AND_WAIT = """
import os, sys, time
from migrations_ops import engine
convention = engine.get_convention(sys.argv[1])
holder = f"{sys.argv[2]} (pid {os.getpid()})"
url = os.environ.pop("DRILL_TARGET_URL")
schema = os.environ.pop("DRILL_TARGET_SCHEMA") or None
with engine.connect(url, schema=schema) as connection:
    if not convention.try_take_lock(connection, holder):
        print("busy", flush=True)
        sys.exit(3)
    print("locked", flush=True)
    time.sleep(3600)
"""


class DrillFailed(Exception):
    """A step of the drill did not go as the runbook says; the message is one line."""


def drill_actor(kind: str) -> Actor:
    """Who the drill's own operations, flag changes and incident entries are recorded as."""
    return Actor(user=None, name=f"drill:{kind}", door=Door.TASK)


# --- the faults ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LockFault:
    pid: int
    holder: str
    made_at: object  # datetime: when the holder was killed, the lock left behind


def leave_lock_behind(target: Target, holder_prefix: str) -> LockFault:
    """A real process takes the target's migration lock, commits, and is killed (SIGKILL)."""
    process = subprocess.Popen(  # noqa: S603 (our own interpreter and code)
        [sys.executable, "-c", _TAKE_LOCK_AND_WAIT, target.convention, holder_prefix],
        cwd=settings.BASE_DIR,
        env={
            **os.environ,
            "DRILL_TARGET_URL": target.connection_url,
            "DRILL_TARGET_SCHEMA": target.schema or "",
        },
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], FAULT_READY_SECONDS)
        said = process.stdout.readline().strip() if ready else ""
        if said != "locked":
            process.kill()
            process.wait()
            error = process.stderr.read().strip().splitlines()
            why = said or (error[-1] if error else f"no answer in {FAULT_READY_SECONDS} s")
            raise DrillFailed(f"the lock-taking process did not take the lock: {why}")
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.stdout.close()
        process.stderr.close()
    return LockFault(process.pid, f"{holder_prefix} (pid {process.pid})", timezone.now())


def holder_is_gone(pid: int) -> bool:
    """Whether the process is gone from this host (the drill made it here)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def drill_script_versions() -> list[str]:
    return [script.version for script in engine.parse_directory(DRILL_SCRIPTS)]


def snapshot(target: Target) -> engine.Catalog:
    with ops.open_target(target) as connection:
        return engine.snapshot(connection)


# --- the run -------------------------------------------------------------------------------
class DrillProcedure:
    """One run of a drill, recorded on its DrillRun as it goes."""

    def __init__(self, run: DrillRun):
        self.run = run
        self.drill = run.drill
        self.target = run.drill.target
        self.kind = run.drill.kind
        self.actor = drill_actor(self.kind)
        self.lines: list[str] = []
        self.incident: Incident | None = None
        self.fault_at = None
        self.flags_before = ops_selectors.flags_of(self.target)
        self.cleanups: list[tuple[str, Callable[[], None]]] = []

    # --- recording ---------------------------------------------------------------------------
    def log(self, text: str) -> None:
        self.lines.append(f"{incident_services.utc(timezone.now())} {text}")
        DrillRun.objects.filter(pk=self.run.pk).update(log="\n".join(self.lines))

    def seconds_since_fault(self, moment) -> float:
        return round((moment - self.fault_at).total_seconds(), 3)

    def open_incident(self, title: str, culprit: str = "") -> None:
        self.incident = incident_services.open_incident(
            actor=self.actor,
            title=title,
            scenario=DRILL_SCENARIOS[self.kind],
            severity=Severity.SEV4,
            targets=[self.target],
            culprit_migration=culprit,
            impact_started_at=self.fault_at,
            is_drill=True,
        )
        DrillRun.objects.filter(pk=self.run.pk).update(incident=self.incident)
        self.run.incident = self.incident
        self.log(f"drill incident #{self.incident.pk} opened")

    def reached(self, phase: str, evidence: str) -> None:
        """The phase ends now: the incident's timestamp and the run's measured seconds."""
        moment = timezone.now()
        name = {"detect": "detected", "mitigate": "mitigated", "recover": "recovered"}[phase]
        self.incident = incident_services.set_timestamp(
            actor=self.actor, incident=self.incident, name=name, when=moment
        )
        seconds = self.seconds_since_fault(moment)
        setattr(self.run, f"{phase}_seconds", seconds)
        DrillRun.objects.filter(pk=self.run.pk).update(**{f"{phase}_seconds": seconds})
        self.log(f"{name} {seconds:.3f} s after the fault: {evidence}")

    def execute(self, operation: Operation) -> Operation:
        """Run the drill's operation here; when a worker claimed it first, wait for it."""
        operation = ops.run_in_this_process(operation, worker="drill")
        what = f"operation #{operation.pk} ({operation.get_kind_display()})"
        self.log(f"{what}: {operation.get_status_display().lower()}")
        if operation.status != OperationStatus.SUCCEEDED:
            raise DrillFailed(f"{what} {operation.status}: {operation.error or 'no error given'}")
        return operation

    def verify_clean(self) -> str:
        """A verify operation finds no problem (migrations merely pending aside)."""
        operation = self.execute(
            ops.request_verify(
                actor=self.actor,
                target=self.target,
                reason=f"drill run #{self.run.pk}: verify recovery",
                incident=self.incident,
            )
        )
        problems = [
            problem["message"]
            for problem in operation.result.get("problems", [])
            if problem["code"] not in ("pending", "no_scripts")
        ]
        if problems:
            raise DrillFailed(f"verify found problems: {'; '.join(problems)}")
        status = ops.read_target_status(self.target, include_applied=False)
        if status.error or status.observation.held:
            raise DrillFailed(f"{self.target.name}: lock not free after recovery")
        return f"verify #{operation.pk} clean, lock free"

    # --- the two drills ------------------------------------------------------------------------
    def lock_release(self) -> None:
        prefix = f"drill:lock_release run #{self.run.pk}"
        fault = leave_lock_behind(self.target, prefix)
        self.fault_at = fault.made_at
        self.cleanups.append(("release the lock the drill left", self._release_drill_lock))
        self.log(f"fault: process {fault.pid} took the lock of {self.target.name} and was killed")
        self.open_incident(f"Drill: migration lock left by a killed process on {self.target.name}")

        status = ops.read_target_status(self.target, include_applied=False)
        if status.error:
            raise DrillFailed(f"{self.target.name} could not be read: {status.error}")
        holder = status.observation.holder
        if not status.observation.held:
            raise DrillFailed("the status read did not see the lock the drill left")
        if holder and holder != fault.holder:
            raise DrillFailed(f"the lock is held by {holder!r}, not by the drill's process")
        if not holder_is_gone(fault.pid):
            raise DrillFailed(f"the lock's holder (pid {fault.pid}) is still running")
        self.reached("detect", f"lock held by {holder or 'an unnamed holder'}, pid gone")

        unlock = ops.request_force_unlock(
            actor=self.actor,
            target=self.target,
            reason=f"drill run #{self.run.pk}: release the lock left by killed pid {fault.pid}",
            release_fresh=True,
            confirm_name=self.target.name,
            incident=self.incident,
        )
        self.execute(unlock)
        self.reached("mitigate", f"force unlock #{unlock.pk} released the lock")
        self.reached("recover", self.verify_clean())

    def _release_drill_lock(self) -> None:
        convention = engine.get_convention(self.target.convention)
        with ops.open_target(self.target) as connection:
            lock = convention.read_lock(connection)
            prefix = f"drill:lock_release run #{self.run.pk} "
            if lock.held and (lock.holder is None or lock.holder.startswith(prefix)):
                convention.release_lock(connection, expected_rows=lock.rows)
                self.log("cleanup: the lock the drill left was released")

    def rollback(self) -> None:
        flags_before = self.flags_before
        stage_before = self.target.flag_stage
        catalog_before = snapshot(self.target)
        self._refuse_pending()
        versions = drill_script_versions()
        self._import(str(DRILL_SCRIPTS))
        self.cleanups.append(("drop the drill's script", self._drop_drill_script))
        self.cleanups.append(("roll back the drill's migration", self._roll_back_if_applied))
        apply = ops.request_apply(
            actor=self.actor,
            target=self.target,
            reason=f"drill run #{self.run.pk}: apply the drill's bad migration",
            to_version=versions[-1],
            confirm_name=self.target.name,
        )
        self.execute(apply)
        culprit = apply.params["migrations"][-1]
        self.fault_at = timezone.now()
        self.log(f"fault: {culprit} applied on {self.target.name} (operation #{apply.pk})")
        self.open_incident(f"Drill: bad migration applied on {self.target.name}", culprit)

        status = ops.read_target_status(self.target)
        applied = [entry.name for entry in status.applied or []]
        if status.error or culprit not in applied:
            raise DrillFailed(f"the status read did not show {culprit} applied")
        self.reached("detect", f"{culprit} seen applied ({len(applied)} applied)")

        disabled = stage_before == FlagStage.NORMAL
        if disabled:
            # Cleaned up after the rollback (cleanups run last first): re-enabled earlier, an
            # application's auto-migrator could apply the drill's migration again.
            self.cleanups.insert(1, ("re-enable auto-migration", self._reenable_if_disabled))
            ops.emergency_disable(
                actor=self.actor,
                targets=[self.target],
                reason=f"drill run #{self.run.pk}: stop auto-migration before the rollback",
            )
            self.log("AUTO_MIGRATE disabled (emergency disable)")
        else:
            self.log(f"flags left alone: the re-enable stage is {stage_before}, not normal")
        rollback = ops.request_rollback(
            actor=self.actor,
            target=self.target,
            reason=f"drill run #{self.run.pk}: roll back {culprit}",
            version=versions[-1],
            confirm_name=self.target.name,
            incident=self.incident,
        )
        self.execute(rollback)
        self.reached("mitigate", f"rollback #{rollback.pk} of {culprit} succeeded")

        # The sandbox's scripts as they were before the verify, so that the verify the fleet
        # view shows counts nothing of the drill's own migration.
        self._drop_drill_script()
        clean = self.verify_clean()
        changes = engine.diff(catalog_before, snapshot(self.target))
        if changes:
            shown = "; ".join(change.detail for change in changes[:5])
            raise DrillFailed(f"the schema differs from before the drill: {shown}")
        if disabled:
            self._reenable(flags_before)
        self.reached("recover", f"{clean}, schema as before, flags as before")

    def _refuse_pending(self) -> None:
        status = ops.read_target_status(self.target)
        if status.error:
            raise DrillFailed(f"{self.target.name} could not be read: {status.error}")
        versions = set(drill_script_versions())
        scripts = [s for s in ops.script_summaries(self.target) if s.version not in versions]
        pending = engine.plan.pending(status.applied, scripts, None)
        if pending:
            names = ", ".join(script.filename for script in pending)
            raise DrillFailed(
                f"{self.target.name} has pending migrations ({names}): apply or drop them first"
            )

    def _import(self, directory: str) -> None:
        report = ops.import_scripts(actor=self.actor, target=self.target, directory=directory)
        self.log(
            f"scripts imported from {Path(directory).name or directory}: "
            f"added {report.added or '-'}, removed {report.removed or '-'}"
        )

    def _drop_drill_script(self) -> None:
        # An empty folder: the drill's script, no longer applied, is dropped; the target's
        # own scripts, all applied (checked first), are kept.
        with tempfile.TemporaryDirectory() as empty:
            self._import(empty)

    def _roll_back_if_applied(self) -> None:
        versions = drill_script_versions()
        status = ops.read_target_status(self.target)
        drill_files = {
            s.filename for s in ops.script_summaries(self.target) if s.version in versions
        }
        if status.error or not drill_files & {entry.name for entry in status.applied or []}:
            return
        self.execute(
            ops.request_rollback(
                actor=self.actor,
                target=self.target,
                reason=f"drill run #{self.run.pk}: clean up the drill's migration",
                version=versions[-1],
                confirm_name=self.target.name,
                incident=self.incident,
            )
        )

    def _reenable_if_disabled(self) -> None:
        if Target.objects.get(pk=self.target.pk).flag_stage != FlagStage.NORMAL:
            self._reenable(self.flags_before)

    def _reenable(self, flags_before: dict) -> None:
        """The runbook's progressive re-enable, then the flags exactly as they were."""
        self.target.refresh_from_db()
        for step in range(ops_selectors.next_reenable_step(self.target) or 4, 4):
            ops.reenable_step(
                actor=self.actor,
                target=self.target,
                step=step,
                reason=f"drill run #{self.run.pk}: re-enable step {step}",
            )
        differing = {
            name: value
            for name, value in flags_before.items()
            if ops_selectors.flags_of(self.target)[name] != value
        }
        if differing:
            ops.change_flags(
                actor=self.actor,
                target=self.target,
                changes=differing,
                reason=f"drill run #{self.run.pk}: flags as before the drill",
                kind="drill",
            )
        self.log("auto-migration re-enabled, flags as before the drill")

    # --- closing -----------------------------------------------------------------------------
    def check_and_close(self) -> None:
        """The validation checklist (the console's own checks, then the rest with what the
        drill saw), the post-mortem fields, and the incident closed."""
        incident = self.incident
        incident_services.run_checks(actor=self.actor, incident=incident)
        evidence = self._evidence()
        for item in incident.checklist.order_by("id"):
            if item.result == CheckResult.PASSED or item.key not in evidence:
                continue
            passed, text = evidence[item.key]
            incident_services.tick_checklist_item(
                actor=self.actor, item=item, passed=passed, evidence=text
            )
        incident.refresh_from_db()
        incident.root_cause = ROOT_CAUSE
        incident.no_action_items_reason = NO_ACTION_ITEMS_REASON
        incident.summary = f"{self.drill}: run #{self.run.pk}"
        incident_services.update_incident(
            actor=self.actor,
            incident=incident,
            changed=["root_cause", "no_action_items_reason", "summary"],
        )
        incident_services.change_status(
            actor=self.actor, incident=incident, status=IncidentStatus.CLOSED
        )
        incident.refresh_from_db()
        self.incident = incident
        self.log(f"drill incident #{incident.pk} closed")

    def _evidence(self) -> dict[str, tuple[bool, str]]:
        name = self.target.name
        target = Target.objects.get(pk=self.target.pk)
        flags = ops_selectors.flags_of(target)
        status = ops.read_target_status(self.target, include_applied=False)
        row = next((r for r in ops_selectors.fleet_overview() if r["id"] == self.target.pk), None)
        state = row["state"] if row else "unknown"
        others = (
            Operation.objects.filter(
                target=self.target,
                requested_at__gte=self.fault_at,
                kind__in=(OperationKind.APPLY, OperationKind.ROLLBACK),
            )
            .exclude(incident=self.incident)
            .exclude(requested_by_name=self.actor.name)
            .count()
        )
        return {
            ChecklistKey.AUTO_MIGRATE: (
                flags == self.flags_before,
                f"{name}: AUTO_MIGRATE={flags['AUTO_MIGRATE']}, flags as before the drill"
                if flags == self.flags_before
                else f"{name}: flags {flags}, before the drill {self.flags_before}",
            ),
            ChecklistKey.API_RESPONDING: (
                status.error is None,
                f"{name}: the console's status read answered"
                if status.error is None
                else f"{name}: {status.error}",
            ),
            ChecklistKey.MONITORING_NORMAL: (
                state != "critical",
                f"{name}: fleet health {state}"
                + (f" ({'; '.join(row['reasons'])})" if row and row["reasons"] else ""),
            ),
            ChecklistKey.NO_MIGRATION_ATTEMPTS: (
                others == 0,
                f"{name}: {others} migration operation(s) since the fault besides the drill's",
            ),
        }

    def score(self) -> bool | None:
        """Met when every phase met the objective the incident copied; None without any."""
        results = selectors.objective_results(self.incident)
        verdicts = [result.verdict for result in results]
        if all(verdict == selectors.UNKNOWN for verdict in verdicts):
            return None
        return all(verdict == selectors.MET for verdict in verdicts)

    # --- the whole run -------------------------------------------------------------------------
    def perform(self) -> DrillRun:
        self.log(f"{self.drill} started by {self.run.started_by}")
        error = ""
        try:
            {DrillKind.LOCK_RELEASE: self.lock_release, DrillKind.ROLLBACK: self.rollback}[
                self.kind
            ]()
            self.check_and_close()
        except (DrillFailed, ops.ServiceError, engine.EngineError) as failure:
            error = str(failure)
        except Exception as failure:  # recorded, never left running
            error = f"internal error: {type(failure).__name__}: {failure}"
        if error:
            self.log(f"FAILED: {error}")
            self._clean_up()
            self._note_failure(error)
        met = self.score() if self.incident is not None and not error else None
        status = DrillRunStatus.FAILED if error else DrillRunStatus.SUCCEEDED
        DrillRun.objects.filter(pk=self.run.pk).update(
            status=status,
            finished_at=timezone.now(),
            met_objectives=met,
            error=error,
            log="\n".join(self.lines),
        )
        self.run.refresh_from_db()
        return self.run

    def _clean_up(self) -> None:
        for what, cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception as failure:  # every cleanup is tried
                self.log(f"cleanup failed ({what}): {type(failure).__name__}: {failure}")

    def _note_failure(self, error: str) -> None:
        if self.incident is None:
            return
        with contextlib.suppress(ops.ServiceError):
            incident_services.add_note(
                actor=self.actor,
                incident=self.incident,
                text=f"Drill run #{self.run.pk} failed: {error}",
            )


def perform(run: DrillRun) -> DrillRun:
    return DrillProcedure(run).perform()
