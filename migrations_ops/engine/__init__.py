"""The engine: talks to target databases over DB-API connections.

It imports nothing from Django, so it can be tested and reused on its own. Every error it
raises is an ``EngineError`` whose message is one line, safe to show to a user: it never
contains a connection URL or a password.
"""

from .connection import TargetConnection, connect
from .conventions import CONVENTIONS, AppliedMigration, Convention, LockState, get_convention
from .errors import (
    EngineError,
    LockChanged,
    LockNotHeld,
    NotAMigrationsDatabase,
    TargetUnreachable,
    UnsupportedTarget,
)
from .target_url import dialect_of, mask_url

__all__ = [
    "CONVENTIONS",
    "AppliedMigration",
    "Convention",
    "EngineError",
    "LockChanged",
    "LockNotHeld",
    "LockState",
    "NotAMigrationsDatabase",
    "TargetConnection",
    "TargetUnreachable",
    "UnsupportedTarget",
    "connect",
    "dialect_of",
    "get_convention",
    "mask_url",
]
