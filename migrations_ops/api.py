"""The HTTP door for applications and monitors. Every answer is JSON, errors included:
``{"error": {"code": "...", "message": "..."}}``."""

from __future__ import annotations

import json
from functools import wraps

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpResponse, HttpResponseNotModified, JsonResponse
from django.urls import reverse
from django.utils import timezone

from incidents import services as incident_services
from incidents.models import Incident
from migrations_ops import openapi, selectors, services
from migrations_ops.actors import Actor
from migrations_ops.models import Door, Target
from opsconsole.security import otp_required_for
from opsconsole.views import body_too_large_message

# How each refusal from the services reads over HTTP; anything else is a state conflict.
ERROR_STATUS = [
    (services.InvalidRequest, 400, "invalid_request"),
    (services.PermissionDenied, 403, "forbidden"),
    (services.TargetNotFound, 404, "unknown_target"),
    (services.OperationNotFound, 404, "unknown_operation"),
    (incident_services.IncidentNotFound, 404, "unknown_incident"),
    (services.TargetUnavailable, 503, "target_unavailable"),
    (services.ServiceError, 409, "conflict"),
]


def json_error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message}}, status=status)


def service_error(error: services.ServiceError) -> JsonResponse:
    status, code = next((s, c) for kind, s, c in ERROR_STATUS if isinstance(error, kind))
    return json_error(status, code, str(error))


def allow(method: str):
    """One HTTP method only, refusing others in JSON like every other error."""

    def decorator(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if request.method != method:
                response = json_error(
                    405, "method_not_allowed", f"{request.method} is not allowed here: use {method}"
                )
                response["Allow"] = method
                return response
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


# Every body this API takes is one flat object; a few levels leave room, thousands would
# exhaust the parser's recursion.
MAX_JSON_DEPTH = 8
TOO_DEEP = f"the request body is nested deeper than {MAX_JSON_DEPTH} levels"


class InvalidJson(ValueError):
    pass


def parse_json_object(raw: bytes) -> dict:
    """The body as one JSON object, refusing (InvalidJson, one line) anything no view could
    store or walk: not JSON, not an object, nested deeper than MAX_JSON_DEPTH, or a string
    holding a NUL or a lone surrogate."""
    try:
        body = json.loads(raw or b"{}")
    except RecursionError:
        raise InvalidJson(TOO_DEEP) from None
    except ValueError:
        raise InvalidJson("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidJson("the request body must be a JSON object")
    pending = [(body, 1, "")]  # no recursion: the value, its depth, where it sits
    while pending:
        value, depth, where = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidJson(TOO_DEEP)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            place = f"{where}.{key}" if where else str(key)
            for text in (key, item):
                if isinstance(text, str) and services.UNSTORABLE_TEXT.search(text):
                    raise InvalidJson(
                        f"{place[:60]!r} holds a NUL character or a lone surrogate "
                        "(such as \\u0000 or \\ud800), which the console cannot store"
                    )
            if isinstance(item, dict | list):
                pending.append((item, depth + 1, place))
    return body


def json_object_body(view):
    """Parse the request body as one JSON object (``parse_json_object``), passed to the view
    as ``body``; a JSON 400 otherwise, a body over DATA_UPLOAD_MAX_MEMORY_SIZE included."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        try:
            body = parse_json_object(request.body)
        except RequestDataTooBig:
            return json_error(400, "body_too_large", body_too_large_message())
        except InvalidJson as error:
            return json_error(400, "invalid_json", str(error))
        return view(request, *args, body=body, **kwargs)

    return wrapper


def incident_from(body: dict) -> Incident | None:
    """The incident a request names (``"incident": N``), if any."""
    number = body.get("incident")
    if number is None:
        return None
    if isinstance(number, bool) or not isinstance(number, int):
        raise services.InvalidRequest("incident must be an incident number, such as 12")
    return incident_services.get_incident(number)


def staff_api(permission: str):
    """A logged-in staff session holding ``permission``; JSON 401/403 otherwise."""

    def decorator(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            user = request.user
            if not user.is_authenticated:
                return json_error(401, "not_authenticated", "log in to the console first")
            if otp_required_for(user) and not user.is_verified():
                # A session from before two-factor authentication was turned on.
                return json_error(
                    401, "not_verified", "log in to the admin again with your TOTP token"
                )
            if not user.is_staff or not user.has_perm(permission):
                return json_error(403, "forbidden", f"{user.get_username()} may not read this")
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


def api_reader(permission: str):
    """Read-only endpoints: an application's ``Authorization: Bearer TOKEN`` (sets
    ``request.api_token``, a ``services.TokenIdentity``; the view keeps to the token's targets
    with ``may_read``) or a staff session holding ``permission`` (``request.api_token`` is
    None)."""

    def decorator(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            header = request.headers.get("Authorization", "")
            if header:
                scheme, _, raw = header.partition(" ")
                if scheme.lower() != "bearer" or not raw.strip():
                    return json_error(
                        401, "not_authenticated", "send the token as: Authorization: Bearer TOKEN"
                    )
                try:
                    request.api_token = services.authenticate_api_token_cached(raw.strip())
                except services.InvalidToken as error:
                    return json_error(401, "invalid_token", str(error))
                return view(request, *args, **kwargs)
            request.api_token = None
            return staff_api(permission)(view)(request, *args, **kwargs)

        return wrapper

    return decorator


def may_read(request, target) -> bool:
    """Whether the caller may read ``target``: staff sessions read all, tokens their scope."""
    return may_read_id(request, target.pk)


def may_read_id(request, target_id: int) -> bool:
    token = getattr(request, "api_token", None)
    return token is None or target_id in token.target_ids


def scope_target_ids(request) -> list[int]:
    """The targets the caller may read, by name: all for staff, a token's own otherwise."""
    token = getattr(request, "api_token", None)
    if token is None:
        return services.target_ids_by_name()
    return services.target_ids_by_name(only=token.target_ids, version=token.targets_version)


def readable_target(request, name: str) -> Target:
    """The target ``name`` if the caller may read it: TargetNotFound, or PermissionDenied for a
    token not scoped to it."""
    target = services.get_target(name)
    if not may_read(request, target):
        raise services.PermissionDenied(
            f"the token {request.api_token.prefix}… may not read target {name!r}"
        )
    return target


@allow("GET")
@api_reader("migrations_ops.view_target")
def migrations_status(request):
    """Each target's lock and applied migrations (``?target=NAME`` for one), from a reading at
    most STATUS_MAX_AGE seconds old (``?live=1``: read now); each says how old its reading is."""
    name = request.GET.get("target")
    try:
        target_ids = [readable_target(request, name).pk] if name else scope_target_ids(request)
    except services.ServiceError as error:
        return service_error(error)
    live = request.GET.get("live", "").lower() in ("1", "true", "yes")
    head = {
        "checked_at": timezone.now().isoformat(),
        "max_age_seconds": 0 if live else settings.STATUS_MAX_AGE,
    }
    # The targets' JSON comes ready-made (see services.target_status_json).
    body = (
        json.dumps(head)[:-1] + ',"targets":' + services.target_status_json(target_ids, live=live)
    )
    return HttpResponse(body + "}", content_type="application/json")


@allow("GET")
@api_reader("migrations_ops.view_target")
def target_flags(request, name: str):
    """The runtime flags ``name``'s auto-migrator obeys. ``ETag`` and ``Cache-Control:
    max-age`` (MIGRATION_CACHE_TTL); ``If-None-Match`` with the current tag answers 304."""
    try:
        document = services.flags_document(name, version=_known_version(request))
    except services.ServiceError as error:
        return service_error(error)
    if not may_read_id(request, document.target_id):
        return json_error(
            403, "forbidden", f"the token {request.api_token.prefix}… may not read target {name!r}"
        )
    if document.etag in _etags(request.headers.get("If-None-Match", "")):
        response = HttpResponseNotModified()
    else:
        response = HttpResponse(document.body, content_type="application/json")
    response["ETag"] = document.etag
    # private: each answer depends on who asks (a shared cache must not serve it to another).
    response["Cache-Control"] = f"private, max-age={document.max_age}"
    return response


def _known_version(request) -> int | None:
    """The targets version read along with the token (one round trip to the cache for both)."""
    token = getattr(request, "api_token", None)
    return token.targets_version if token is not None else None


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


@allow("GET")
@api_reader("migrations_ops.view_target")
def migrations_health(request):
    """``ok`` / ``warning`` / ``critical`` per target and overall by the runbook's alert
    thresholds, each failing check named; 503 when critical. Locks are read as for the status
    (readings at most STATUS_MAX_AGE seconds old). ``workers``: critical when no worker has
    been seen within WORKER_SEEN_WITHIN seconds, and when one was last seen."""
    target_ids = scope_target_ids(request)
    readings = {report["name"]: report for report in services.target_status_reports(target_ids)}
    thresholds = selectors.AlertThresholds.current()
    allowed = set(target_ids)
    rows = [row for row in selectors.fleet_overview(thresholds=thresholds) if row["id"] in allowed]
    # No worker alive: nothing runs the operations the console queues (critical too).
    workers = selectors.worker_liveness()
    overall = selectors.worst_state(
        [{"status": row["state"]} for row in rows] + [{"status": workers.status}]
    )
    body = {
        "status": overall,
        "checked_at": timezone.now().isoformat(),
        "workers": workers.as_dict(),
        "thresholds": {
            "lock_held_seconds": thresholds.lock_held_seconds,
            "failure_rate": thresholds.failure_rate,
            "retry_rate": thresholds.retry_rate,
        },
        "targets": [
            {
                "name": row["name"],
                "environment": row["environment"],
                "status": row["state"],
                "checks": row["checks"],
                "lock": row["lock"],
                "reading_age_seconds": readings.get(row["name"], {}).get("reading_age_seconds"),
                "migrations_24h": row["migrations"],
                "failure_rate": row["failure_rate"],
                "retry_rate": row["retry_rate"],
                "open_incidents": row["open_incidents"],
            }
            for row in rows
        ],
    }
    return JsonResponse(body, status=503 if overall == selectors.CRITICAL else 200)


@allow("GET")
def openapi_document(request):
    """This API described in OpenAPI 3.1 (public: it holds no data, only the shapes)."""
    return JsonResponse(openapi.document())


def not_found(request, unmatched: str = ""):
    """Any other URL under /api/."""
    return json_error(404, "not_found", f"no such endpoint: {request.path}")


@allow("POST")
@staff_api("migrations_ops.view_target")
@json_object_body
def force_unlock(request, name: str, body: dict):
    """Request the release of a target's lock: ``{"reason": "...", "release_fresh": false,
    "confirm_name": "...", "incident": 12}`` (``incident``, optional: the number of the incident
    it serves). Answers 202 with the operation; poll its ``url``."""
    try:
        target = services.get_target(name)
        operation = services.request_force_unlock(
            actor=Actor.for_user(request.user, Door.API),
            target=target,
            reason=str(body.get("reason") or ""),
            release_fresh=body.get("release_fresh") is True,
            confirm_name=str(body.get("confirm_name") or ""),
            incident=incident_from(body),
        )
    except services.ServiceError as error:
        return service_error(error)
    operation = services.get_operation(operation.pk)
    return JsonResponse(
        {
            "operation": selectors.operation_report(operation),
            "url": reverse("migrations_ops_api:operation", args=[operation.pk]),
            "warning": selectors.broker_down_warning(operation),
        },
        status=202,
    )


@allow("GET")
@staff_api("migrations_ops.view_operation")
def operation_detail(request, operation_id: int):
    try:
        operation = services.get_operation(operation_id)
    except services.ServiceError as error:
        return service_error(error)
    return JsonResponse({"operation": selectors.operation_report(operation)})


@allow("POST")
@staff_api("migrations_ops.view_operation")
@json_object_body
def decide_operation(request, operation_id: int, decision: str, body: dict):
    """Approve or reject an operation awaiting approval: ``{"reason": "..."}``."""
    decide = services.approve_operation if decision == "approve" else services.reject_operation
    try:
        operation = decide(
            actor=Actor.for_user(request.user, Door.API),
            operation=services.get_operation(operation_id),
            reason=str(body.get("reason") or ""),
        )
    except services.ServiceError as error:
        return service_error(error)
    return JsonResponse({"operation": selectors.operation_report(operation)})
