"""The engine: talks to target databases over DB-API connections.

It imports nothing from Django, so it can be tested and reused on its own. Every error it
raises is an ``EngineError`` whose message is one line, safe to show to a user: it never
contains a connection URL or a password.
"""

from . import plan
from .catalog import Catalog, Change, Column, Index, diff, invalid_indexes, snapshot
from .connection import TargetConnection, connect
from .conventions import CONVENTIONS, AppliedMigration, Convention, LockState, get_convention
from .errors import (
    EngineError,
    LockChanged,
    LockNotHeld,
    NotAMigrationsDatabase,
    ScriptError,
    TargetUnreachable,
    UnsupportedTarget,
)
from .runner import LockBusy, RunReport, RunSettings, StatementFailed, Step
from .runner import mark as mark_books
from .runner import run as run_migrations
from .scripts import (
    MAX_VERSION_DIGITS,
    MigrationScript,
    Statement,
    normalise,
    parse_directory,
    parse_file,
    split_statements,
)
from .target_url import dialect_of, mask_url, mask_urls_in

__all__ = [
    "CONVENTIONS",
    "MAX_VERSION_DIGITS",
    "AppliedMigration",
    "Catalog",
    "Change",
    "Column",
    "Convention",
    "EngineError",
    "Index",
    "LockBusy",
    "LockChanged",
    "LockNotHeld",
    "LockState",
    "MigrationScript",
    "NotAMigrationsDatabase",
    "RunReport",
    "RunSettings",
    "ScriptError",
    "Statement",
    "StatementFailed",
    "Step",
    "TargetConnection",
    "TargetUnreachable",
    "UnsupportedTarget",
    "connect",
    "dialect_of",
    "diff",
    "get_convention",
    "invalid_indexes",
    "mark_books",
    "mask_url",
    "mask_urls_in",
    "normalise",
    "parse_directory",
    "parse_file",
    "plan",
    "run_migrations",
    "snapshot",
    "split_statements",
]
