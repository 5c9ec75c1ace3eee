"""The HTTP door for applications and monitors. Every answer is JSON, errors included:
``{"error": {"code": "...", "message": "..."}}``."""

from __future__ import annotations

from functools import wraps

from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from migrations_ops import selectors, services


def json_error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message}}, status=status)


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


@require_GET
@staff_api("migrations_ops.view_target")
def migrations_status(request):
    """Each target's lock and applied migrations, read live (``?target=NAME`` for one)."""
    name = request.GET.get("target")
    try:
        targets = [services.get_target(name)] if name else list(selectors.targets_with_observations())
    except services.TargetNotFound as error:
        return json_error(404, "unknown_target", str(error))
    statuses = [services.read_target_status(target) for target in targets]
    return JsonResponse(
        {
            "checked_at": timezone.now().isoformat(),
            "targets": [selectors.status_report(s.target, s.applied, s.error) for s in statuses],
        }
    )
