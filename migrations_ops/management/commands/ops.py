"""``python manage.py ops``: the console's command-line door.

Errors go to stderr as one line with a non-zero exit status (2 when an operation did not
finish within ``--wait``). Without ``--as USER`` the command acts as the host's operator
(recorded under the OS account name); with it, as that console user, with their permissions.
Naming a production target on the command line is the typed confirmation it needs.
The subcommands, their arguments and their handlers live by family in ``migrations_ops.cli``;
this module builds the one parser, resolves the actor, dispatches and keeps the one error handler.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from migrations_ops import services
from migrations_ops.actors import Actor
from migrations_ops.cli import audit, demo, drills, flags, operations, scripts, targets, tokens
from migrations_ops.cli.operations import AwaitingApproval
from migrations_ops.fields import SecretKeyError
from migrations_ops.refusals import record_refusal

# In the order ``ops --help`` lists them.
SUBCOMMANDS = {
    subcommand.name: subcommand
    for subcommand in (
        targets.REGISTER,
        targets.STATUS,
        operations.UNLOCK,
        scripts.IMPORT,
        operations.UP,
        operations.ROLLBACK,
        operations.VERIFY,
        operations.CLEANUP,
        operations.MARK_APPLIED,
        operations.MARK_ROLLED_BACK,
        operations.APPROVE,
        operations.REJECT,
        flags.FLAGS,
        flags.DISABLE,
        flags.REENABLE,
        tokens.TOKEN,
        operations.SWEEP,
        operations.WORKERS,
        audit.AUDIT_VERIFY,
        demo.DEMO,
        drills.DRILL,
        targets.ROTATE_SECRETS,
        flags.AUTOMIGRATE,
    )
}


class Command(BaseCommand):
    help = (
        "Operate on target databases: register, status, unlock, import, up, rollback, verify, "
        "cleanup, mark-applied, mark-rolled-back, flags, disable, reenable, token, sweep, "
        "workers, automigrate, drill, audit-verify, demo, rotate-secrets."
    )

    def add_arguments(self, parser):
        parser.add_argument("--as", dest="as_user", metavar="USER", help="act as this console user")
        commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
        for subcommand in SUBCOMMANDS.values():
            subcommand.add_parser(commands)

    def handle(self, *args, **options):
        self._refuse_unstorable_text(options)
        actor = self._actor(options["as_user"])
        subcommand = SUBCOMMANDS[options["subcommand"]]
        try:
            return subcommand.handle(self, actor, options)
        except services.ServiceError as error:
            # A refusal is on the audit trail, after the refused work was rolled back.
            record_refusal(actor, f"cli.{options['subcommand']}", error)
            raise CommandError(str(error)) from None
        except SecretKeyError as error:
            # A key missing from TARGET_SECRET_KEY is one line too, not a traceback.
            raise CommandError(str(error)) from None
        except AwaitingApproval as waiting:
            self.stdout.write(str(waiting))
            return None

    @staticmethod
    def _refuse_unstorable_text(options) -> None:
        """An argument that was not UTF-8 reaches Python holding lone surrogates, which no
        database column (nor the audit trail) can hold: one line, before anything is read."""
        for name, value in options.items():
            for text in value if isinstance(value, list | tuple) else [value]:
                if isinstance(text, str) and services.UNSTORABLE_TEXT.search(text):
                    option = "--as" if name == "as_user" else "--" + name.replace("_", "-")
                    raise CommandError(
                        f"{option} holds a NUL character or text that is not UTF-8: retype it"
                    )

    def _actor(self, username: str | None) -> Actor:
        if not username:
            return Actor.shell_operator()
        try:
            user = get_user_model().objects.get(username=username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"unknown user {username!r}") from None
        return Actor.for_user(user, "cli")
