from django.http import JsonResponse
from django.views.csrf import csrf_failure as html_csrf_failure
from django.views.defaults import server_error as html_server_error


def csrf_failure(request, reason=""):
    """API callers get the same JSON error shape as every other API error."""
    if request.path.startswith("/api/"):
        return JsonResponse(
            {"error": {"code": "csrf_failed", "message": f"CSRF check failed: {reason}"}},
            status=403,
        )
    return html_csrf_failure(request, reason=reason)


def server_error(request):
    """``handler500``: API callers get a JSON error, people the usual page."""
    if request.path.startswith("/api/"):
        return JsonResponse(
            {
                "error": {
                    "code": "server_error",
                    "message": "the console failed to answer; the error is in its log",
                }
            },
            status=500,
        )
    return html_server_error(request)
