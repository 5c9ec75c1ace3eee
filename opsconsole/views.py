from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse
from django.views.csrf import csrf_failure as html_csrf_failure
from django.views.defaults import bad_request as html_bad_request
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


def bad_request(request, exception):
    """``handler400`` (a request Django refused before any view: a body over
    DATA_UPLOAD_MAX_MEMORY_SIZE read by the CSRF check, too many fields): JSON under /api/."""
    if not request.path.startswith("/api/"):
        return html_bad_request(request, exception)
    if isinstance(exception, RequestDataTooBig):
        code, message = "body_too_large", body_too_large_message()
    else:
        code, message = "bad_request", "the request was refused as malformed"
    return JsonResponse({"error": {"code": code, "message": message}}, status=400)


def body_too_large_message() -> str:
    return (
        f"the request body is larger than the {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes "
        "allowed (DATA_UPLOAD_MAX_MEMORY_SIZE)"
    )
