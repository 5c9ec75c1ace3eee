class EngineError(Exception):
    """A failure talking to a target. The message is one line and never holds a secret."""


class UnsupportedTarget(EngineError):
    """The connection URL names a database the engine does not speak."""


class TargetUnreachable(EngineError):
    """The target could not be connected to within the connect timeout."""


class NotAMigrationsDatabase(EngineError):
    """The target lacks the tables its convention keeps its books in."""


class LockNotHeld(EngineError):
    """A release was asked for, but nobody holds the migration lock."""


class LockChanged(EngineError):
    """The lock is no longer the one the operator saw: someone released or re-took it."""


class ScriptError(EngineError):
    """A migration script or folder cannot be read; the message starts with ``file:line:``."""
