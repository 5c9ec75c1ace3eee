"""Migration scripts: importing them from an application's folder, and summaries of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from migrations_ops import engine, plain_rows
from migrations_ops.actors import Actor
from migrations_ops.models import MigrationScript, Target
from migrations_ops.services.audit import record_audit_event
from migrations_ops.services.errors import InvalidRequest, require_permission
from migrations_ops.services.observations import read_target_status


@dataclass
class ImportReport:
    added: list[str]
    updated: list[str]
    unchanged: list[str]
    drift: list[str]
    removed: list[str]
    missing: list[str]

    def as_dict(self) -> dict:
        return {
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "drift": self.drift,
            "removed": self.removed,
            "missing": self.missing,
        }


def import_scripts(*, actor: Actor, target: Target, directory: str) -> ImportReport:
    """Store the migrations folder's scripts. A changed script whose migration is applied on
    the target (or whose state cannot be read) is not replaced: it is recorded as drift. A
    script gone from the folder (a reverted migration) is dropped if it is not applied, and
    kept, reported missing, if it is."""
    require_permission(actor, "migrations_ops.import_scripts", "import migration scripts")
    try:
        parsed = engine.parse_directory(directory)
    except engine.ScriptError as error:
        raise InvalidRequest(str(error)) from None
    applied = _applied_or_none(target)
    existing = {script.version: script for script in target.scripts.all()}
    report = ImportReport([], [], [], [], [], [])
    now = timezone.now()
    with transaction.atomic():
        for script in parsed:
            row = existing.pop(script.version, None)
            if row is None:
                _script_row(target, script).save()
                report.added.append(script.filename)
            elif row.checksum == script.checksum:
                if row.drift_checksum:
                    row.drift_checksum, row.drift_detected_at = "", None
                    row.save(update_fields=["drift_checksum", "drift_detected_at"])
                report.unchanged.append(script.filename)
            elif applied is None or engine.plan.applied_for(row, applied) is not None:
                if row.drift_checksum != script.checksum:
                    row.drift_checksum, row.drift_detected_at = script.checksum, now
                    row.save(update_fields=["drift_checksum", "drift_detected_at"])
                report.drift.append(script.filename)
            else:
                updated = _script_row(target, script)
                updated.pk = row.pk
                updated.save()
                report.updated.append(script.filename)
        for row in sorted(existing.values(), key=lambda row: row.filename):
            if applied is not None and engine.plan.applied_for(row, applied) is None:
                row.delete()
                report.removed.append(row.filename)
            else:
                report.missing.append(row.filename)
        record_audit_event(
            actor,
            "scripts.imported",
            target=target,
            details={"directory": str(directory), **report.as_dict()},
        )
    return report


def _applied_or_none(target: Target) -> list[engine.AppliedMigration] | None:
    status = read_target_status(target)
    return status.applied


def _script_row(target: Target, script: engine.MigrationScript) -> MigrationScript:
    return MigrationScript(
        target=target,
        version=script.version,
        name=script.name,
        filename=script.filename,
        layout=script.layout,
        up_sql=script.up_sql,
        down_sql=script.down_sql,
        up_statements=[{"sql": s.sql, "line": s.line} for s in script.up_statements],
        down_statements=[{"sql": s.sql, "line": s.line} for s in script.down_statements],
        transactional=script.transactional,
        needs_no_transaction=list(script.needs_no_transaction),
        checksum=script.checksum,
    )


def script_summaries(target: Target) -> list[engine.plan.ScriptSummary]:
    """The target's stored scripts in version order, as planning needs them: without their up
    SQL and statement lists, which for hundreds of scripts would cost milliseconds a request."""
    # The down SQL is a few lines where the rest is not: the up SQL and both statement lists.
    return [
        engine.plan.ScriptSummary(version, name, filename, checksum, bool(down.strip()))
        for version, name, filename, checksum, down in _script_rows(
            target, ("version", "name", "filename", "checksum", "down_sql"), None
        )
    ]


_ENGINE_SCRIPT_FIELDS = (
    "version",
    "name",
    "filename",
    "layout",
    "up_sql",
    "down_sql",
    "up_statements",
    "down_statements",
    "transactional",
    "needs_no_transaction",
    "checksum",
)


def engine_scripts(
    target: Target, *, versions: Sequence[str] | None = None
) -> list[engine.MigrationScript]:
    """The target's stored scripts in the engine's own shape, SQL included; only those of
    ``versions`` if given (plan with ``script_summaries``, then load what was chosen)."""
    scripts = []
    for values in _script_rows(target, _ENGINE_SCRIPT_FIELDS, versions):
        row = dict(zip(_ENGINE_SCRIPT_FIELDS, values, strict=True))
        up, down = row.pop("up_statements"), row.pop("down_statements")
        outside = row.pop("needs_no_transaction")
        scripts.append(
            engine.MigrationScript(
                **row,
                up_statements=tuple(engine.Statement(s["sql"], s["line"]) for s in up),
                down_statements=tuple(engine.Statement(s["sql"], s["line"]) for s in down),
                needs_no_transaction=tuple(outside),
            )
        )
    return scripts


def _script_rows(
    target: Target, fields: Sequence[str], versions: Sequence[str] | None
) -> list[tuple]:
    """``fields`` of the target's scripts (those of ``versions`` if given), in version order:
    read on every request and run, so in plain SQL (``plain_rows``)."""
    version = plain_rows.quoted(MigrationScript, "version")
    where, params = f"{plain_rows.quoted(MigrationScript, 'target')} = %s", [target.pk]
    if versions is not None:
        if not versions:
            return []
        where += f" AND {version} IN ({', '.join(['%s'] * len(versions))})"
        params += list(versions)
    return plain_rows.select(MigrationScript, fields, f"{where} ORDER BY {version}", params)


def _no_scripts_hint(target: Target) -> str:
    if target.convention == "knex":
        return (
            f"{target.name} uses Knex, whose migrations are JavaScript: applying or rolling back "
            "needs SQL scripts imported for it (ops import --dir PATH)"
        )
    return f"no migration scripts are imported for {target.name} (ops import --dir PATH)"
