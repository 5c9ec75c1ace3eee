"""``migrations_ops.cli``: every family's subcommand is behind the one ``ops`` verb."""

import importlib
import io
import pkgutil

import pytest
from django.core.management import call_command

import migrations_ops.cli
from migrations_ops.cli.subcommand import Subcommand
from migrations_ops.management.commands.ops import SUBCOMMANDS


def defined_subcommands() -> list[Subcommand]:
    found = []
    for module_info in pkgutil.iter_modules(migrations_ops.cli.__path__):
        module = importlib.import_module(f"migrations_ops.cli.{module_info.name}")
        found += [value for value in vars(module).values() if isinstance(value, Subcommand)]
    return found


def test_every_family_subcommand_is_listed_once():
    defined = defined_subcommands()
    assert len(defined) == len(set(defined)) == len(SUBCOMMANDS)
    assert set(defined) == set(SUBCOMMANDS.values())
    assert all(name == subcommand.name for name, subcommand in SUBCOMMANDS.items())


def test_help_lists_them_in_order(capsys):
    with pytest.raises(SystemExit) as exit_info:
        call_command("ops", "--help", stdout=io.StringIO())
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out.split("positional arguments:")[1].split("options:")[0]
    names = [
        line.split()[0] for line in listed.splitlines() if line[:4] == "    " and line[4] != " "
    ]
    assert names == [
        "register",
        "status",
        "unlock",
        "import",
        "up",
        "rollback",
        "verify",
        "cleanup",
        "mark-applied",
        "mark-rolled-back",
        "approve",
        "reject",
        "flags",
        "disable",
        "reenable",
        "token",
        "sweep",
        "workers",
        "audit-verify",
        "demo",
        "drill",
        "rotate-secrets",
        "automigrate",
    ]
