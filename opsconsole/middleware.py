"""Where a request came from, for the audit trail: a request id, the client's address and,
once authenticated, who is asking and through which door; and the refusal of addresses no view
could serve (``HostileInputMiddleware``).

``RequestContextMiddleware`` keeps them in a context variable for the length of the request
(``ActingUserMiddleware`` adds the user after Django's AuthenticationMiddleware);
``migrations_ops.services.record_audit_event`` reads it, so every event written while serving
the request carries them, whichever service writes it. The CLI and tasks bind their own
(``bound``): none for the CLI, the task's id for a task.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from django.conf import settings
from django.contrib.messages.middleware import MessageMiddleware
from django.contrib.messages.storage import default_storage
from django.http import HttpResponse, JsonResponse
from django.utils.functional import SimpleLazyObject, empty
from django.utils.html import escape

from opsconsole import security
from opsconsole.views import body_too_large_message

REQUEST_ID_HEADER = "X-Request-ID"
# A request id from a proxy or a client is kept only if it looks like one: nothing that could
# forge a line in a log or overflow the column.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@dataclass(frozen=True)
class RequestContext:
    request_id: str = ""
    ip: str | None = None
    # The request's user (Django's lazy ``request.user``: read only when an event needs it)
    # and door ("admin" or "api"); None outside a request (the CLI, a shell, a task).
    user: Any = None
    door: str = ""

    def acting_user(self):
        """The authenticated user making the request, or None."""
        user = self.user
        return user if user is not None and user.is_authenticated else None


NO_REQUEST = RequestContext()
_current: ContextVar[RequestContext | None] = ContextVar("opsconsole_request", default=None)


def current() -> RequestContext:
    return _current.get() or NO_REQUEST


@contextlib.contextmanager
def bound(*, request_id: str = "", ip: str | None = None):
    token = _current.set(RequestContext(request_id=request_id, ip=normalised_ip(ip)))
    try:
        yield current()
    finally:
        _current.reset(token)


@contextlib.contextmanager
def bound_user(user, *, door: str):
    """``user`` acting through ``door`` for the length of the block (the request's context
    kept)."""
    token = _current.set(replace(current(), user=user, door=door))
    try:
        yield current()
    finally:
        _current.reset(token)


def bind_task(task_id: str) -> None:
    """A worker's task: its events carry the task's id (a worker runs one task at a time)."""
    _current.set(RequestContext(request_id=(task_id or "")[:64]))


def unbind_task() -> None:
    _current.set(None)


def normalised_ip(value: str | None) -> str | None:
    """The address as the database gives it back (``2001:DB8::1`` is ``2001:db8::1``), or
    None when it is not one."""
    try:
        return str(ipaddress.ip_address((value or "").strip()))
    except ValueError:
        return None


def request_id_of(request) -> str:
    offered = request.headers.get(REQUEST_ID_HEADER, "")
    if SANE_REQUEST_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


def client_ip(request) -> str | None:
    """As django-axes sees it (``opsconsole.security.client_ip``: REMOTE_ADDR, or behind
    TRUSTED_PROXY_COUNT proxies the address the outermost one saw, when it is one)."""
    return normalised_ip(security.client_ip(request))


class RequestContextMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request_id = request_id_of(request)
        request.request_id = request_id
        with bound(request_id=request_id, ip=client_ip(request)):
            response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        return response


class ActingUserMiddleware:
    """After AuthenticationMiddleware: who is asking, for events written by code that has no
    request in hand (the signals recording changes of users and groups: migrations_ops.people)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        with bound_user(request.user, door=door_of(request)):
            return self.get_response(request)


def door_of(request) -> str:
    """The door an HTTP request came through: "api" under /api/, else "admin"."""
    return "api" if request.path.startswith("/api/") else "admin"


class LazyMessageMiddleware(MessageMiddleware):
    """Django's, with the message storage (cookie and session) built only when a message is
    added or read: an API request never uses it, and then saves nothing either."""

    def process_request(self, request):
        request._messages = SimpleLazyObject(partial(default_storage, request))

    def process_response(self, request, response):
        messages = getattr(request, "_messages", None)
        if isinstance(messages, SimpleLazyObject) and messages._wrapped is empty:
            return response
        return super().process_response(request, response)


# --- input no door can store ---------------------------------------------------------------------
NUL_REFUSED = (
    "the address holds a NUL character (%00), which the console cannot search for or store: "
    "remove it"
)


def refusal(request, status: int, code: str, message: str) -> HttpResponse:
    """A refusal where the user is: the API's JSON error shape under /api/ (and /metrics, which
    the API's document describes), a short page elsewhere (the admin's)."""
    if request.path_info.startswith(("/api/", "/metrics")):
        return JsonResponse({"error": {"code": code, "message": message}}, status=status)
    return HttpResponse(
        f"<!doctype html><title>Bad request</title><h1>Bad request ({status})</h1>"
        f"<p>{escape(message)}</p>",
        status=status,
    )


class HostileInputMiddleware:
    """Refuses, with a 400, a request whose path or query string holds a NUL character:
    PostgreSQL text cannot hold one, so every filter, search and object id carrying it would
    otherwise fail deep inside a query. An API body announced larger than
    DATA_UPLOAD_MAX_MEMORY_SIZE is refused here too, before the CSRF check reads it: refused
    there, it would be Django's HTML page (the debug page with DEBUG on), not the API's JSON."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if "\x00" in request.path_info or any(
            "\x00" in name or any("\x00" in value for value in values)
            for name, values in request.GET.lists()
        ):
            return refusal(request, 400, "invalid_request", NUL_REFUSED)
        if request.path_info.startswith("/api/") and _announced_too_large(request):
            return refusal(request, 400, "body_too_large", body_too_large_message())
        return self.get_response(request)


def _announced_too_large(request) -> bool:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return False
    return limit is not None and length > limit
