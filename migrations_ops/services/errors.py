"""The refusals services raise: ``ServiceError``, its kinds, and the checks that raise them."""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError

from migrations_ops.actors import Actor
from migrations_ops.models import Target


class ServiceError(Exception):
    """A refusal or failure to show the user as it is: one line, no secrets."""


class InvalidRequest(ServiceError):
    """The request itself is incomplete or wrong (a missing reason, a mistyped name)."""


class PermissionDenied(ServiceError):
    pass


class TargetNotFound(ServiceError):
    pass


class OperationInProgress(ServiceError):
    """One mutating operation per target at a time: ``operation_id`` is the one in the way."""

    def __init__(self, message: str, *, operation_id: int):
        super().__init__(message)
        self.operation_id = operation_id


class TargetUnavailable(ServiceError):
    """The target could not be read (unreachable, or not a migrations database)."""


def require_permission(actor: Actor, permission: str, action: str) -> None:
    if not actor.has_perm(permission):
        raise PermissionDenied(f"{actor.name} is not allowed to {action}")


class InvalidToken(ServiceError):
    pass


class OperationNotFound(ServiceError):
    pass


def _validation_message(error: ValidationError) -> str:
    if hasattr(error, "error_dict"):
        return "; ".join(
            f"{field}: {' '.join(messages)}" for field, messages in error.message_dict.items()
        )
    return " ".join(error.messages)


# What PostgreSQL text cannot hold: NUL, and a UTF-16 surrogate standing alone (JSON's
# "\ud800", or a command-line argument that was not UTF-8).
UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")


def _storable(text: str, what: str) -> str:
    if UNSTORABLE_TEXT.search(text):
        raise InvalidRequest(
            f"the {what} holds a NUL character or text that is not UTF-8, which cannot be stored"
        )
    return text


def _require_reason(reason: str, what: str) -> str:
    reason = _storable((reason or "").strip(), "reason")
    if not reason:
        raise InvalidRequest(f"a reason is required to {what}")
    return reason


def _require_confirmation(target: Target, confirm_name: str | None, what: str) -> None:
    if target.is_production and (confirm_name or "").strip() != target.name:
        raise InvalidRequest(f"{target.name} is a production target: type its name to {what}")


class ApiTokenNotFound(ServiceError):
    pass
