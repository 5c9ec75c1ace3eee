"""``ops import``: a migrations folder's SQL scripts, read into the console."""

from __future__ import annotations

from django.core.management.base import CommandError

from migrations_ops import services
from migrations_ops.cli.subcommand import Subcommand


def _import_arguments(imports) -> None:
    imports.add_argument("--target", required=True)
    imports.add_argument("--dir", required=True, help="the application's migrations folder")


def import_scripts(command, actor, options) -> None:
    target = services.get_target(options["target"])
    report = services.import_scripts(actor=actor, target=target, directory=options["dir"])
    for label, names in report.as_dict().items():
        if names:
            command.stdout.write(f"{label}: {', '.join(names)}")
    counts = ", ".join(f"{len(names)} {label}" for label, names in report.as_dict().items())
    command.stdout.write(f"imported into {target.name}: {counts}")
    if report.drift:
        raise CommandError(
            f"{len(report.drift)} applied migration(s) changed in the folder and were NOT "
            f"replaced (drift): {', '.join(report.drift)}"
        )


IMPORT = Subcommand(
    "import", "import a migrations folder's SQL scripts", import_scripts, _import_arguments
)
