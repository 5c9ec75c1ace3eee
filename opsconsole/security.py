"""Who is logging in, from where, and whether they must give a second factor."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl, urlencode

from django.conf import settings
from django.http import HttpRequest
from django.template.defaultfilters import pprint
from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter

from migrations_ops.engine import mask_urls_in


def client_ip(request) -> str | None:
    """The client's address: REMOTE_ADDR, or behind TRUSTED_PROXY_COUNT reverse proxies the
    address the outermost of them saw (each proxy appends the one it saw to X-Forwarded-For,
    so only that many entries from the right can be trusted; the client writes the rest)."""
    proxies = settings.TRUSTED_PROXY_COUNT
    if proxies > 0:
        forwarded = [
            part.strip()
            for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")
            if part.strip()
        ]
        if len(forwarded) >= proxies and _is_address(forwarded[-proxies]):
            return forwarded[-proxies]
    return request.META.get("REMOTE_ADDR")


def _is_address(text: str) -> bool:
    """A proxy's header may carry anything a client wrote: only an IP address is used."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def otp_required_for(user) -> bool:
    """Whether ``user`` must be verified by a TOTP device to use the admin: a member of one of
    OTP_REQUIRED_GROUPS (none unless two-factor authentication is turned on)."""
    groups = settings.OTP_REQUIRED_GROUPS
    if not groups or not user.is_authenticated:
        return False
    return user.groups.filter(name__in=groups).exists()


# --- error reports: Django's debug page (DEBUG is on for the embedded default) and mails -------
# Setting, META, cookie and POST names whose values are hidden whole: Django's list, and more.
HIDDEN_NAMES = re.compile(
    r"API|AUTH|TOKEN|KEY|SECRET|PASS|PWD|SIGNATURE|CREDENTIAL|CSRF|HTTP_COOKIE", flags=re.I
)


def masked_parameter(name: str, value: str) -> str:
    """A GET or POST parameter's value: hidden if named like a secret, else the URLs in it
    masked (by parsing each: ``mask_url``)."""
    if HIDDEN_NAMES.search(name):
        return SafeExceptionReporterFilter.cleansed_substitute
    return mask_urls_in(str(value))


def masked_path(path: str) -> str:
    """A request's path and query string, each parameter's value masked (``?token=`` hidden,
    ``?next=postgresql://u:pw@h/db`` masked: decoded first, then encoded again)."""
    path, mark, query = path.partition("?")
    parameters = [
        (name, masked_parameter(name, value))
        for name, value in parse_qsl(query, keep_blank_values=True)
    ]
    return f"{path}?{urlencode(parameters, safe=':/*@')}" if mark else path


class Shown:
    """A value as the debug page prints it (Django's pprint: a value failing to print says
    why), its URLs masked; a request as Django prints it, its query string masked."""

    def __init__(self, value):
        if isinstance(value, HttpRequest):
            path = masked_path(value.get_full_path())
            self.text = f"<{type(value).__name__}: {value.method} {path!r}>"
        else:
            self.text = mask_urls_in(pprint(value))

    def __repr__(self) -> str:
        return self.text


class SecretsExceptionReporterFilter(SafeExceptionReporterFilter):
    """DEFAULT_EXCEPTION_REPORTER_FILTER: every setting, META entry (environment variables
    under runserver), cookie, POST value and local variable of the traceback is shown with
    the URLs in it masked (REDIS_URL, CELERY_BROKER_URL, CACHES' LOCATION, DATABASE_URL, a
    target's connection URL), and any named like a secret (TARGET_SECRET_KEY, AUDIT_CHAIN_KEY,
    a PASSWORD) hidden whole. Django applies its filter only with DEBUG off; this one always
    does, since the embedded console runs with DEBUG on."""

    hidden_settings = HIDDEN_NAMES

    def is_active(self, request):
        return True

    def cleanse_setting(self, key, value):
        # Django's recursion into dicts and lists calls this again for each item.
        cleansed = super().cleanse_setting(key, value)
        # str(): a lazy object standing for a text passes isinstance but not re.sub.
        return mask_urls_in(str(cleansed)) if isinstance(cleansed, str) else cleansed

    def get_safe_request_meta(self, request):
        meta = super().get_safe_request_meta(request)
        # The query string as sent (percent-encoded), and the paths with it (gunicorn's).
        for name in ("QUERY_STRING", "REQUEST_URI", "RAW_URI"):
            if isinstance(meta.get(name), str):
                shown = masked_path(("?" if name == "QUERY_STRING" else "") + meta[name])
                meta[name] = shown.removeprefix("?") if name == "QUERY_STRING" else shown
        return meta

    def get_post_parameters(self, request):
        parameters = super().get_post_parameters(request)
        if not parameters:
            return parameters
        parameters = parameters.copy()
        for name, values in list(parameters.lists()):
            parameters.setlist(name, [masked_parameter(name, value) for value in values])
        return parameters

    def get_traceback_frame_variables(self, request, tb_frame):
        return [
            (name, Shown(value))
            for name, value in super().get_traceback_frame_variables(request, tb_frame)
        ]


class SecretsExceptionReporter(ExceptionReporter):
    """DEFAULT_EXCEPTION_REPORTER: the parts of the report the filter does not see (the
    exception's message and notes, chained causes, the query string) with URLs masked."""

    def get_traceback_data(self):
        data = super().get_traceback_data()
        for name in ("exception_value", "exception_notes"):
            if name in data:
                data[name] = mask_urls_in(data[name])
        if "request_GET_items" in data:
            data["request_GET_items"] = [
                (name, masked_parameter(name, value)) for name, value in data["request_GET_items"]
            ]
            data["request_insecure_uri"] = masked_path(data["request_insecure_uri"])
        for frame in data["frames"]:
            if frame.get("exc_cause") is not None:
                frame["exc_cause"] = mask_urls_in(str(frame["exc_cause"]))
        return data
