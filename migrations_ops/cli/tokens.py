"""``ops token create|list|revoke``: the applications' API tokens."""

from __future__ import annotations

from migrations_ops import selectors, services
from migrations_ops.cli.subcommand import Subcommand


def _token_arguments(token) -> None:
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    token_create = token_commands.add_parser(
        "create", help="a new token (printed once, alone on its line: keep it)"
    )
    token_create.add_argument("--name", required=True, help="the application using it")
    token_create.add_argument(
        "--targets", required=True, metavar="N1,N2", help="the targets it may read"
    )
    token_revoke = token_commands.add_parser("revoke", help="revoke a token for good")
    token_revoke.add_argument("prefix", metavar="PREFIX", help="as `ops token list` shows it")
    token_commands.add_parser("list", help="every token: prefix, targets, use, revocation")


def manage_tokens(command, actor, options) -> None:
    {"create": _create, "revoke": _revoke, "list": _list}[options["token_command"]](
        command, actor, options
    )


def _create(command, actor, options) -> None:
    names = [name.strip() for name in options["targets"].split(",") if name.strip()]
    targets = [services.get_target(name) for name in names]
    token, raw = services.create_api_token(actor=actor, name=options["name"], targets=targets)
    # The token alone on stdout (TOKEN=$(ops token create ...)); the rest on stderr.
    command.stdout.write(raw)
    command.stderr.write(
        f"API token {token.prefix} for {token.name}, reading {', '.join(names)}. "
        "It is shown this once and kept only as a hash: store it now "
        "(the application sends it as: Authorization: Bearer TOKEN)."
    )


def _revoke(command, actor, options) -> None:
    token = services.revoke_api_token(actor=actor, token=services.get_api_token(options["prefix"]))
    command.stdout.write(f"API token {token.prefix} ({token.name}) revoked: refused from now on")


def _list(command, actor, options) -> None:
    if not actor.has_perm("migrations_ops.view_apitoken"):
        raise services.PermissionDenied(f"{actor.name} is not allowed to list API tokens")
    for token in selectors.api_tokens():
        targets = ",".join(target.name for target in token.targets.all())
        used = f"{token.last_used_at:%Y-%m-%d %H:%M}" if token.last_used_at else "never"
        state = (
            f"revoked {token.revoked_at:%Y-%m-%d %H:%M} by {token.revoked_by_name}"
            if token.revoked_at
            else "active"
        )
        command.stdout.write(
            f"{token.prefix}  {token.name}  targets={targets}  "
            f"created={token.created_at:%Y-%m-%d %H:%M} by {token.created_by_name}  "
            f"last used={used}  {state}"
        )


TOKEN = Subcommand(
    "token", "create, list or revoke applications' API tokens", manage_tokens, _token_arguments
)
