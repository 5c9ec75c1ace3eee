"""The HTTP door for applications and monitors. Every answer is JSON, errors included:
``{"error": {"code": "...", "message": "..."}}``."""

from __future__ import annotations

import json
from functools import wraps

from django.http import JsonResponse
from django.urls import reverse
from django.utils import timezone

from incidents import services as incident_services
from incidents.models import Incident
from migrations_ops import selectors, services
from migrations_ops.actors import Actor
from migrations_ops.models import Door

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


def json_object_body(view):
    """Parse the request body as one JSON object, passed to the view as ``body``."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        try:
            body = json.loads(request.body or b"{}")
        except ValueError:
            return json_error(400, "invalid_json", "the request body is not valid JSON")
        if not isinstance(body, dict):
            return json_error(400, "invalid_json", "the request body must be a JSON object")
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
            if not user.is_staff or not user.has_perm(permission):
                return json_error(403, "forbidden", f"{user.get_username()} may not read this")
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


def api_reader(permission: str):
    """Read-only endpoints: an application's ``Authorization: Bearer TOKEN`` (sets
    ``request.api_token``; the view keeps to the token's targets with ``may_read``) or a staff
    session holding ``permission`` (``request.api_token`` is None)."""

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
                    request.api_token = services.authenticate_api_token(raw.strip())
                except services.InvalidToken as error:
                    return json_error(401, "invalid_token", str(error))
                return view(request, *args, **kwargs)
            request.api_token = None
            return staff_api(permission)(view)(request, *args, **kwargs)

        return wrapper

    return decorator


def may_read(request, target) -> bool:
    """Whether the caller may read ``target``: staff sessions read all, tokens their scope."""
    token = getattr(request, "api_token", None)
    return token is None or target.pk in token.target_ids


@allow("GET")
@staff_api("migrations_ops.view_target")
def migrations_status(request):
    """Each target's lock and applied migrations, read live (``?target=NAME`` for one)."""
    name = request.GET.get("target")
    try:
        targets = (
            [services.get_target(name)] if name else list(selectors.targets_with_observations())
        )
    except services.TargetNotFound as error:
        return service_error(error)
    statuses = [services.read_target_status(target) for target in targets]
    return JsonResponse(
        {
            "checked_at": timezone.now().isoformat(),
            "targets": [selectors.status_report(s.target, s.applied, s.error) for s in statuses],
        }
    )


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
