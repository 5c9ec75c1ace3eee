"""API tokens: creating, revoking and authenticating them (remembered in the shared cache)."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from functools import partial

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.utils import timezone

from migrations_ops.actors import Actor
from migrations_ops.models import ApiToken
from migrations_ops.services.audit import record_audit_event
from migrations_ops.services.errors import (
    ApiTokenNotFound,
    InvalidRequest,
    InvalidToken,
    ServiceError,
    require_permission,
)
from migrations_ops.services.serving import TARGETS_VERSION_KEY, _cache_is_shared, _token_cache_key

# How often a token's ``last_used_at`` is written: often enough to tell an unused token, rarely
# enough that a busy application's polling costs no write per request.
TOKEN_USE_RESOLUTION = dt.timedelta(minutes=1)


def hash_api_token(raw: str) -> str:
    # The token is 32 random bytes: a fast hash suffices (nothing to guess by brute force).
    return hashlib.sha256(raw.encode()).hexdigest()


def authenticate_api_token(raw: str) -> ApiToken:
    """The active token ``raw`` is, with its targets' ids in ``target_ids``; InvalidToken if
    none (unknown or revoked)."""
    token = (
        ApiToken.objects.filter(token_hash=hash_api_token(raw), revoked_at__isnull=True)
        .only("id", "name", "prefix", "last_used_at")
        .first()
    )
    if token is None:
        raise InvalidToken("the API token is unknown or revoked")
    token.target_ids = frozenset(token.targets.values_list("id", flat=True))
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > TOKEN_USE_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token


# Tokens read like "opc_<43 random characters>"; their first API_TOKEN_PREFIX_LENGTH characters
# name them in lists, logs and `ops token revoke` (the rest is never kept).
API_TOKEN_PREFIX = "opc_"  # noqa: S105 (not a secret: every token starts so)
API_TOKEN_PREFIX_LENGTH = 12


def create_api_token(*, actor: Actor, name: str, targets) -> tuple[ApiToken, str]:
    """A new token for the application ``name``, reading only ``targets``. Returns the token
    row and the token itself, which exists nowhere else: show it once, then forget it."""
    require_permission(actor, "migrations_ops.add_apitoken", "create API tokens")
    name = (name or "").strip()
    if not name:
        raise InvalidRequest("an API token needs a name: the application that will use it")
    max_length = ApiToken._meta.get_field("name").max_length
    if len(name) > max_length:
        raise InvalidRequest(f"an API token's name has at most {max_length} characters")
    targets = list(targets)
    if not targets:
        raise InvalidRequest("an API token needs at least one target to read")
    for _attempt in range(3):  # prefixes are random: a clash is rare, and a new draw clears it
        raw = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
        try:
            with transaction.atomic():
                token = ApiToken.objects.create(
                    name=name,
                    prefix=raw[:API_TOKEN_PREFIX_LENGTH],
                    token_hash=hash_api_token(raw),
                    created_by=actor.user,
                    created_by_name=actor.name,
                )
                token.targets.set(targets)
                record_audit_event(
                    actor,
                    "api_token.created",
                    details={
                        "token": token.pk,
                        "name": name,
                        "prefix": token.prefix,
                        "targets": sorted(target.name for target in targets),
                    },
                )
        except IntegrityError:
            continue
        return token, raw
    raise ServiceError("could not draw an unused token prefix; try again")


def get_api_token(prefix: str) -> ApiToken:
    token = ApiToken.objects.filter(prefix=(prefix or "").strip()).first()
    if token is None:
        raise ApiTokenNotFound(f"no API token with prefix {prefix!r} (see: ops token list)")
    return token


def revoke_api_token(*, actor: Actor, token: ApiToken) -> ApiToken:
    """Revoke ``token`` for good: requests bearing it are refused from now on."""
    require_permission(actor, "migrations_ops.change_apitoken", "revoke API tokens")
    with transaction.atomic():
        locked = ApiToken.objects.select_for_update().filter(pk=token.pk).first()
        if locked is None:
            raise ApiTokenNotFound(f"API token {token.prefix} no longer exists")
        if locked.revoked_at is not None:
            raise InvalidRequest(
                f"API token {locked.prefix} ({locked.name}) was already revoked on "
                f"{locked.revoked_at:%Y-%m-%d %H:%M} UTC by {locked.revoked_by_name}"
            )
        locked.revoked_at = timezone.now()
        locked.revoked_by_name = actor.name
        locked.save(update_fields=["revoked_at", "revoked_by_name"])
        record_audit_event(
            actor,
            "api_token.revoked",
            details={"token": locked.pk, "name": locked.name, "prefix": locked.prefix},
        )
        # Forgotten now and again once committed: a request between the two may have cached
        # the token as still active.
        forget = partial(cache.delete, _token_cache_key(locked.token_hash))
        forget()
        transaction.on_commit(forget)
    token.revoked_at, token.revoked_by_name = locked.revoked_at, locked.revoked_by_name
    return token


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """Who an API request is, as remembered: what the doors need of the token, and the targets
    version read along with it (see serving.py; None without a shared cache)."""

    pk: int
    name: str
    prefix: str
    target_ids: frozenset[int]
    targets_version: int | None = None


def authenticate_api_token_cached(raw: str) -> TokenIdentity:
    """``authenticate_api_token``, remembered for API_TOKEN_CACHE_SECONDS (a revoke forgets it
    at once), so an application polling its flags costs no query to know who it is; with a
    shared cache the targets version comes in the same round trip. Without one (no Redis, or
    Redis unreachable) the token is read from the database: a revoke made by another process
    could not reach this process's memory."""
    if not _cache_is_shared():
        return _identity(authenticate_api_token(raw))
    key = _token_cache_key(hash_api_token(raw))
    found = cache.get_many([key, TARGETS_VERSION_KEY])
    if not _cache_is_shared():
        # Redis failed just now: what came back is this process's own memory.
        return _identity(authenticate_api_token(raw))
    known = found.get(key)
    if known is None:
        identity = _identity(authenticate_api_token(raw))  # raises InvalidToken
        known = (identity.pk, identity.name, identity.prefix, identity.target_ids)
        cache.set(key, known, settings.API_TOKEN_CACHE_SECONDS)
    return TokenIdentity(*known, targets_version=found.get(TARGETS_VERSION_KEY))


def _identity(token: ApiToken) -> TokenIdentity:
    return TokenIdentity(token.pk, token.name, token.prefix, token.target_ids)
