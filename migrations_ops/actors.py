"""Who is acting, and through which door. Services take an Actor instead of a bare user so
that every door is checked and recorded the same way."""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from typing import Any

from migrations_ops.models import Door


@dataclass(frozen=True)
class Actor:
    user: Any  # a User, or None for the machine's own operator (a shell on the console host)
    name: str
    door: str

    @classmethod
    def for_user(cls, user, door: str) -> Actor:
        return cls(user=user, name=user.get_username(), door=door)

    @classmethod
    def shell_operator(cls) -> Actor:
        """Someone with a shell on the console's host: they hold its keys already, so the CLI
        without ``--as USER`` acts with every permission, recorded under the OS account name."""
        return cls(user=None, name=f"{getpass.getuser()}@{socket.gethostname()}", door=Door.CLI)

    @classmethod
    def worker(cls, hostname: str) -> Actor:
        return cls(user=None, name=f"worker:{hostname or 'local'}", door=Door.TASK)

    @classmethod
    def sweeper(cls) -> Actor:
        """The periodic sweeper (``services.sweep_operations`` run by Celery beat, in beat's
        own process). Named ``worker:sweeper`` as ever, so the audit trail reads the same."""
        return cls.worker("sweeper")

    @classmethod
    def auto_migrator(cls, application: str) -> Actor:
        """An application's own migrator at start-up (``ops automigrate``), on this host."""
        return cls(
            user=None, name=f"automigrate:{application}@{socket.gethostname()}", door=Door.CLI
        )

    def has_perm(self, permission: str) -> bool:
        if self.user is None:
            return True
        return bool(self.user.is_active and self.user.has_perm(permission))
