"""``ops drill schedule|run|list``: the runbook's drills on sandbox targets."""

from __future__ import annotations

from django.core.management.base import CommandError

from incidents import selectors as incident_selectors
from incidents import services as incident_services
from incidents.models import Drill, DrillKind, DrillRunStatus
from migrations_ops import services
from migrations_ops.cli.subcommand import Subcommand


def _drill_arguments(drill) -> None:
    drill_commands = drill.add_subparsers(dest="drill_command", required=True, metavar="ACTION")
    for action, help_text in [
        ("schedule", "schedule a drill (monthly lock release, quarterly rollback)"),
        ("run", "run a drill now, here, and print its measured times and score"),
    ]:
        drill_action = drill_commands.add_parser(action, help=help_text)
        drill_action.add_argument("--kind", required=True, choices=DrillKind.values)
        drill_action.add_argument("--target", required=True, help="a sandbox target")
        if action == "schedule":
            drill_action.add_argument(
                "--disable", action="store_true", help="keep it, but off the schedule"
            )
    drill_commands.add_parser("list", help="every drill: schedule, last run, overdue")


def manage_drills(command, actor, options) -> None:
    action = options["drill_command"]
    if action == "list":
        return _list_drills(command)
    target = services.get_target(options["target"])
    if action == "schedule":
        drill = incident_services.schedule_drill(
            actor=actor, kind=options["kind"], target=target, enabled=not options["disable"]
        )
        state = "scheduled" if drill.enabled else "disabled"
        command.stdout.write(f"drill #{drill.pk} {drill}: {state} ({_crontab(drill)})")
        return None
    drill = Drill.objects.filter(kind=options["kind"], target=target).first()
    if drill is None:
        raise CommandError(
            f"no {options['kind']} drill on {target.name}: "
            f"schedule it first (ops drill schedule --kind {options['kind']} "
            f"--target {target.name})"
        )
    run = incident_services.run_drill(actor=actor, drill=drill)
    for line in run.log.splitlines():
        command.stdout.write(f"  {line}")
    for phase in ("detect", "mitigate", "recover"):
        seconds = getattr(run, f"{phase}_seconds")
        shown = "-" if seconds is None else f"{seconds:.3f} s"
        command.stdout.write(f"time to {phase}: {shown}")
    score = {True: "objectives met", False: "objectives missed", None: "not scored"}
    incident = f", drill incident #{run.incident_id}" if run.incident_id else ""
    command.stdout.write(
        f"drill run #{run.pk}: {run.status}, {score[run.met_objectives]}{incident}"
    )
    if run.status != DrillRunStatus.SUCCEEDED:
        raise CommandError(f"drill run #{run.pk} failed: {run.error}")
    return None


def _list_drills(command) -> None:
    states = incident_selectors.drill_states()
    if not states:
        command.stdout.write("no drills (ops drill schedule --kind KIND --target SANDBOX)")
    for state in states:
        drill, run = state.drill, state.last_run
        last = f"#{run.pk} {run.status} {run.started_at:%Y-%m-%d %H:%M} UTC" if run else "never"
        if state.overdue:
            due = "OVERDUE" + (f" since {state.due_since:%Y-%m-%d}" if state.due_since else "")
        else:
            due = f"due {state.due_since:%Y-%m-%d}"
        enabled = "" if drill.enabled else " (disabled)"
        command.stdout.write(
            f"#{drill.pk} {drill.kind} on {drill.target.name}{enabled}: "
            f"{_crontab(drill)}; last run {last}; {due}"
        )


def _crontab(drill: Drill) -> str:
    task = drill.periodic_task
    if task is None or task.crontab is None:
        return "not scheduled"
    c = task.crontab
    return (
        f"cron {c.minute} {c.hour} {c.day_of_month} {c.month_of_year} {c.day_of_week} {c.timezone}"
    )


DRILL = Subcommand(
    "drill",
    "the runbook's drills on sandbox targets: schedule, run, list",
    manage_drills,
    _drill_arguments,
)
