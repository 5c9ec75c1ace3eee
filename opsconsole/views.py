from django.http import JsonResponse
from django.views.csrf import csrf_failure as html_csrf_failure


def csrf_failure(request, reason=""):
    """API callers get the same JSON error shape as every other API error."""
    if request.path.startswith("/api/"):
        return JsonResponse(
            {"error": {"code": "csrf_failed", "message": f"CSRF check failed: {reason}"}},
            status=403,
        )
    return html_csrf_failure(request, reason=reason)
