"""Deciding what to run: which scripts are pending, which applied migration a rollback takes,
and what verify finds wrong. Pure functions over the target's books and the imported scripts."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .conventions import AppliedMigration
from .errors import EngineError

VERSION = re.compile(r"^(\d+)")


class Script(Protocol):
    """What planning needs of an imported migration script."""

    version: str
    name: str
    filename: str
    checksum: str

    @property
    def has_down_sql(self) -> bool: ...


@dataclass(frozen=True)
class ScriptSummary:
    """An imported script without its SQL: enough to plan with, however many a target keeps."""

    version: str
    name: str
    filename: str
    checksum: str
    has_down_sql: bool


class PlanError(EngineError):
    """The request does not fit the books: unknown version, nothing to do, no down SQL…"""


def version_of(name: str) -> str | None:
    match = VERSION.match(name)
    return match.group(1) if match else None


def version_key(version: str) -> tuple[int, str]:
    return (int(version), version)


def stem(name: str) -> str:
    """``001_users.up.sql`` and ``001_users.sql`` and ``001_users.js`` all name ``001_users``."""
    return re.sub(r"(\.(up|down))?\.(sql|js|ts|cjs|mjs)$", "", name)


def script_for(applied: AppliedMigration, scripts: Sequence[Script]) -> Script | None:
    """The script that a book entry records: by version prefix, else by name."""
    version = version_of(applied.name)
    for script in scripts:
        if version is not None and script.version == version:
            return script
        if version is None and stem(script.filename) == stem(applied.name):
            return script
    return None


def applied_for(script: Script, applied: Sequence[AppliedMigration]) -> AppliedMigration | None:
    for entry in applied:
        if script_for(entry, [script]) is script:
            return entry
    return None


def pending(
    applied: Sequence[AppliedMigration], scripts: Sequence[Script], to_version: str | None = None
) -> list[Script]:
    """Scripts not in the books, in version order, up to and including ``to_version``."""
    ordered = sorted(scripts, key=lambda s: version_key(s.version))
    if to_version is not None and not any(s.version == to_version for s in ordered):
        raise PlanError(f"unknown version {to_version}: {known_versions(ordered)}")
    chosen = []
    for script in ordered:
        if applied_for(script, applied) is None:
            chosen.append(script)
        if script.version == to_version:
            break
    return chosen


def latest_applied(applied: Sequence[AppliedMigration]) -> AppliedMigration | None:
    """The newest entry: the highest version, or the last recorded where names carry none."""
    if not applied:
        return None
    versioned = [entry for entry in applied if version_of(entry.name) is not None]
    if versioned:
        return max(versioned, key=lambda entry: version_key(version_of(entry.name)))
    return applied[-1]


def rollback_choice(
    applied: Sequence[AppliedMigration],
    scripts: Sequence[Script],
    version: str | None = None,
    *,
    out_of_order: bool = False,
) -> tuple[AppliedMigration, Script]:
    """The book entry to roll back and its script; the latest applied unless ``version``."""
    latest = latest_applied(applied)
    if latest is None:
        raise PlanError("no migration is applied: there is nothing to roll back")
    if version is None:
        entry = latest
    else:
        matches = [e for e in applied if version_of(e.name) == version or stem(e.name) == version]
        if not matches:
            names = ", ".join(e.name for e in applied[-5:])
            raise PlanError(f"version {version} is not applied (latest applied: {names})")
        entry = matches[0]
        if entry is not latest and not out_of_order:
            raise PlanError(
                f"{entry.name} is not the latest applied migration ({latest.name}): rolling "
                "back an older one needs the explicit out-of-order override"
            )
    script = script_for(entry, scripts)
    if script is None:
        raise PlanError(
            f"no script is imported for {entry.name}: import the application's migrations "
            "folder first (ops import)"
        )
    if not script.has_down_sql:
        raise PlanError(f"{script.filename} has no down SQL: it cannot be rolled back")
    return entry, script


def known_versions(scripts: Sequence[Script]) -> str:
    versions = [s.version for s in scripts]
    if not versions:
        return "no scripts are imported"
    shown = ", ".join(versions[:10]) + (" …" if len(versions) > 10 else "")
    return f"known versions: {shown}"


@dataclass(frozen=True)
class Problem:
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def verify_books(
    applied: Sequence[AppliedMigration],
    scripts: Sequence[Script],
    *,
    drifted: dict[str, str] | None = None,
) -> list[Problem]:
    """Compare the books with the scripts: applied but unknown, changed since applied
    (``drifted``: filename → why), pending, applied out of order."""
    problems = []
    drifted = drifted or {}
    for entry in applied:
        if script_for(entry, scripts) is None:
            problems.append(
                Problem("applied_unknown", f"{entry.name} is applied but no script is known for it")
            )
    for script in sorted(scripts, key=lambda s: version_key(s.version)):
        entry = applied_for(script, applied)
        if entry is None:
            problems.append(Problem("pending", f"{script.filename} is pending"))
        elif script.filename in drifted:
            problems.append(
                Problem(
                    "changed",
                    f"{script.filename} changed since it was applied: {drifted[script.filename]}",
                )
            )
    latest = latest_applied(applied)
    if latest is not None and version_of(latest.name) is not None:
        top = version_key(version_of(latest.name))
        for script in scripts:
            if applied_for(script, applied) is None and version_key(script.version) < top:
                problems.append(
                    Problem(
                        "out_of_order",
                        f"{script.filename} is pending but older than the applied "
                        f"{latest.name}: it would run out of order",
                    )
                )
    problems.extend(_applied_out_of_order(applied))
    return problems


def _applied_out_of_order(applied: Sequence[AppliedMigration]) -> list[Problem]:
    """Entries recorded in an order their versions contradict."""
    problems = []
    newest: tuple[tuple[int, str], AppliedMigration] | None = None
    for entry in applied:
        version = version_of(entry.name)
        if version is None:
            continue
        key = version_key(version)
        if newest is not None and key < newest[0]:
            problems.append(
                Problem(
                    "out_of_order",
                    f"{entry.name} was applied after the newer {newest[1].name}",
                )
            )
        elif newest is None or key > newest[0]:
            newest = (key, entry)
    return problems


def lock_problem(
    held: bool, since: dt.datetime | None, now: dt.datetime, lock_timeout: dt.timedelta
) -> Problem | None:
    if held and since is not None and now - since > lock_timeout:
        age = int((now - since).total_seconds())
        return Problem(
            "stale_lock",
            f"the migration lock has been held for {age} s, longer than the lock timeout "
            f"({int(lock_timeout.total_seconds())} s)",
        )
    return None
