"""The runtime flags' subcommands: read and set them, disable, re-enable, and the auto-migrator."""

from __future__ import annotations

import os
from pathlib import Path

from django.conf import settings
from django.core.management.base import CommandError

from migrations_ops import flag_client, selectors, services
from migrations_ops.actors import Actor
from migrations_ops.cli.subcommand import Subcommand


def _flags_arguments(flags) -> None:
    flags.add_argument("--target", required=True)
    flags.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="e.g. AUTO_MIGRATE=false (repeatable; needs --reason)",
    )
    flags.add_argument("--reason", default="")


def show_or_set_flags(command, actor, options) -> None:
    target = services.get_target(options["target"])
    if options["assignments"]:
        changes = {}
        for assignment in options["assignments"]:
            name, equals, value = assignment.partition("=")
            if not equals:
                raise CommandError(f"--set takes NAME=VALUE, not {assignment!r}")
            changes[name.strip()] = value
        change = services.change_flags(
            actor=actor, target=target, changes=changes, reason=options["reason"]
        )
        command.stdout.write(
            f"flags of {target.name} changed: {selectors.describe_flag_change(change)}"
        )
    _print_flags(command, target)


def _print_flags(command, target) -> None:
    for name, value in selectors.flags_of(target).items():
        command.stdout.write(f"{name}={selectors.flag_value_text(value)}")
    command.stdout.write(f"stage: {target.get_flag_stage_display()}")
    step = selectors.next_reenable_step(target)
    if step:
        command.stdout.write(
            f"next re-enable step: {step} ({selectors.REENABLE_STEPS[step].label})"
        )


def _disable_arguments(disable) -> None:
    which = disable.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", dest="targets", action="append", metavar="NAME")
    which.add_argument("--all", action="store_true", help="every target")
    disable.add_argument("--reason", required=True)


def disable(command, actor, options) -> None:
    if options["all"]:
        targets = list(selectors.targets_with_observations())
    else:
        targets = [services.get_target(name) for name in options["targets"]]
    changes = services.emergency_disable(actor=actor, targets=targets, reason=options["reason"])
    for change in changes:
        command.stdout.write(
            f"{change.target.name}: disabled ({selectors.describe_flag_change(change)})"
        )
    command.stdout.write(f"auto-migration disabled on {len(changes)} target(s)")


def _reenable_arguments(reenable) -> None:
    reenable.add_argument("--target", required=True)
    reenable.add_argument("--step", type=int, required=True, choices=[1, 2, 3])
    reenable.add_argument("--reason", required=True)


def reenable(command, actor, options) -> None:
    target = services.get_target(options["target"])
    change = services.reenable_step(
        actor=actor, target=target, step=options["step"], reason=options["reason"]
    )
    command.stdout.write(
        f"re-enable step {options['step']} taken on {target.name}: "
        f"{selectors.describe_flag_change(change)}"
    )
    _print_flags(command, target)


def _automigrate_arguments(automigrate) -> None:
    automigrate.add_argument("--target", required=True)
    automigrate.add_argument(
        "--app", default="", help="the application's name, recorded as the actor"
    )
    automigrate.add_argument(
        "--console",
        default=os.environ.get("OPSCONSOLE_URL", ""),
        metavar="URL",
        help="read the flags from this console over HTTP (default: $OPSCONSOLE_URL; "
        "unset: from this host's database)",
    )
    automigrate.add_argument(
        "--token",
        default=os.environ.get("OPSCONSOLE_TOKEN", ""),
        help="the application's API token (default: $OPSCONSOLE_TOKEN)",
    )
    automigrate.add_argument(
        "--cache-file",
        default="",
        metavar="PATH",
        help="where the last flags are kept for MIGRATION_CACHE_TTL seconds "
        "(default: DATA_DIR/automigrate/TARGET.flags.json)",
    )
    automigrate.add_argument(
        "--backoff",
        type=float,
        default=services.AUTO_MIGRATE_BACKOFF_SECONDS,
        metavar="SECONDS",
        help="pause after the first failed attempt, doubling after each next one",
    )


def automigrate(command, actor, options) -> None:
    target = services.get_target(options["target"])
    if options["backoff"] < 0:
        raise CommandError("--backoff cannot be negative")
    reading = _automigrate_flags(target, options)
    if reading.note:
        command.stderr.write(f"warning: {reading.note}")
    shown = ", ".join(
        f"{name}={selectors.flag_value_text(value)}" for name, value in reading.flags.items()
    )
    command.stdout.write(f"flags of {target.name} ({reading.origin}): {shown}")
    report = services.auto_migrate(
        actor=Actor.auto_migrator(options["app"] or target.name),
        target=target,
        flags=reading.flags,
        backoff_seconds=options["backoff"],
        say=command.stdout.write,
    )
    if not report.ok:
        raise CommandError(report.lines[-1])


def _automigrate_flags(target, options) -> flag_client.FlagReading:
    """From the console over HTTP, or from this host's books; cached the same way."""
    console, token = options["console"], options["token"]
    if console and not token:
        raise CommandError("--console needs --token (or OPSCONSOLE_TOKEN): an API token")
    default_cache = Path(settings.DATA_DIR) / "automigrate" / f"{target.name}.flags.json"
    try:
        if console:
            fetch = flag_client.http_fetcher(console, token, target.name)
            source = flag_client.flags_url(console, target.name)
        else:

            def fetch(etag: str) -> flag_client.Fetched:
                target.refresh_from_db()
                return flag_client.Fetched(selectors.flags_of(target))

            source = "local"
        cache = flag_client.FlagCache(
            options["cache_file"] or default_cache, source=source, target=target.name
        )
        return flag_client.read_flags(cache, fetch)
    except flag_client.FlagsUnavailable as error:
        raise CommandError(f"cannot read the flags of {target.name}: {error}") from None


FLAGS = Subcommand(
    "flags", "show a target's runtime flags, or set some", show_or_set_flags, _flags_arguments
)
DISABLE = Subcommand(
    "disable",
    "emergency-disable auto-migration (the runbook's quick disable)",
    disable,
    _disable_arguments,
)
REENABLE = Subcommand(
    "reenable", "take a progressive re-enable step", reenable, _reenable_arguments
)
AUTOMIGRATE = Subcommand(
    "automigrate",
    "what an application runs at start-up: obey its flags, apply what is pending",
    automigrate,
    _automigrate_arguments,
)
