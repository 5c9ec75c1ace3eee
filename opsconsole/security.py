"""Who is logging in, from where, and whether they must give a second factor."""

from __future__ import annotations

import ipaddress

from django.conf import settings


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
