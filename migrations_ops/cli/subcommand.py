"""What one ``ops`` subcommand is: its name, its help, its arguments and its handler."""

from __future__ import annotations

from argparse import ArgumentParser
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.management.base import BaseCommand

from migrations_ops.actors import Actor

# A handler writes through the running command's stdout and stderr; an error is an exception.
Handler = Callable[[BaseCommand, Actor, dict[str, Any]], None]


def no_arguments(parser: ArgumentParser) -> None:
    """For a subcommand that takes nothing but ``ops``'s own options."""


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    handle: Handler
    add_arguments: Callable[[ArgumentParser], None] = no_arguments

    def add_parser(self, commands) -> ArgumentParser:
        """Add this subcommand to ``ops``'s subparsers (``commands``), with its arguments."""
        parser = commands.add_parser(self.name, help=self.help)
        self.add_arguments(parser)
        return parser
