"""Refused requests are on the audit trail too: who asked for what, through which door, and
why they were refused.

A service refuses by raising a ``ServiceError``, often inside ``transaction.atomic``: an event
written there would be rolled back with the request. So each door records the refusal where
it catches the error, after the refused work was rolled back, with ``record_refusal``; HTTP
answers 403 (and the API's 400 and 409) are recorded by ``RefusalAuditMiddleware`` in one
place, whichever view gave them, Django's own PermissionDenied included.

A refusal is the console saying no to a request it understood: not allowed (403), invalid
(400), or not now (a conflict, 409: another operation in the way, a rollback out of order).
An unknown name (404) or an unreachable target (503) is not one: nothing was refused.
"""

from __future__ import annotations

import json
import logging

from django.db import transaction

from migrations_ops.actors import Actor
from migrations_ops.models import AuditEvent, Door
from opsconsole import middleware as request_context

logger = logging.getLogger(__name__)

REFUSED = "refused"


def record_refusal(
    actor: Actor,
    request: str,
    refusal: Exception | str,
    *,
    target=None,
    subject=None,
    details: dict | None = None,
) -> AuditEvent | None:
    """Append ``refused.<request>`` with the refusal's message. Where the refused request's
    transaction is still open and failing (it cannot take a write), the refusal is logged
    instead of breaking the answer."""
    from migrations_ops import services

    if isinstance(refusal, services.ServiceError) and not is_refusal(refusal):
        return None
    if transaction.get_connection().needs_rollback:
        logger.warning("refusal not audited (its transaction is failing): %s", refusal)
        return None
    action = f"{REFUSED}.{request}"[:60]
    return services.record_audit_event(
        actor,
        action,
        target=target,
        subject=subject,
        details={
            "request": request,
            "refusal": type(refusal).__name__ if isinstance(refusal, Exception) else "refused",
            "message": _storable(str(refusal))[:2000],
            **(details or {}),
        },
    )


def is_refusal(error) -> bool:
    """Whether a service's error is a refusal (above): the API answers these 400, 403, 409."""
    from migrations_ops import services

    refusals = (services.InvalidRequest, services.PermissionDenied, services.OperationInProgress)
    return isinstance(error, refusals) or type(error) is services.ServiceError


def _storable(text: str) -> str:
    """Hostile text as the database's JSON can keep it: no NUL, no lone surrogate."""
    return text.encode("utf-8", "replace").decode().replace("\x00", "\N{REPLACEMENT CHARACTER}")


def http_actor(request) -> Actor | None:
    """Who made an HTTP request: its logged-in user, or an application's API token."""
    door = Door(request_context.door_of(request))
    token = getattr(request, "api_token", None)
    if token is not None:
        return Actor(user=None, name=f"token:{token.prefix}", door=door)
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return Actor.for_user(user, door)
    return None


def _message_of(response) -> str:
    if response.get("Content-Type", "").startswith("application/json"):
        try:
            return str(json.loads(response.content)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            pass
    return {403: "permission denied", 409: "conflict"}.get(response.status_code, "bad request")


class RefusalAuditMiddleware:
    """After AuthenticationMiddleware: a 403 answer, and an API's 400 or 409, to someone known
    (a logged-in user or an API token) is a refused request. Anonymous ones are not recorded:
    they would let anyone grow the trail at will (failed logins are recorded by the login)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        refused = response.status_code == 403 or (
            response.status_code in (400, 409) and request.path.startswith("/api/")
        )
        if refused and not getattr(response, "streaming", False):
            actor = http_actor(request)
            if actor is not None:
                record_refusal(
                    actor,
                    f"http_{response.status_code}",
                    _message_of(response),
                    details={"method": request.method, "path": _storable(request.path)[:500]},
                )
        return response


def refusal_recorded(request, what: str, refusal: Exception, **about) -> AuditEvent | None:
    """``record_refusal`` for an admin view or action that caught a service's refusal."""
    return record_refusal(Actor.for_user(request.user, Door.ADMIN), what, refusal, **about)


def invalid_form_recorded(request, what: str, form, **about) -> AuditEvent | None:
    """A confirmation page posted with errors (a reason left out, a name mistyped) is a request
    refused too, before any service saw it."""
    from migrations_ops.services import InvalidRequest

    line = "; ".join(
        f"{form[name].label}: {errors[0]}" if name != "__all__" else errors[0]
        for name, errors in form.errors.items()
    )
    return refusal_recorded(request, what, InvalidRequest(line.replace("\n", " ")), **about)
