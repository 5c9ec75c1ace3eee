"""What the API serves from cache: flags documents, the targets version, target status readings.

Process state owned here: ``_flags_memory`` and ``_targets_memory`` (what was derived from
the current targets version), ``_status_memory`` and ``_status_recheck_after`` (status
readings and when to ask the shared cache again), and the threads that read stale targets
again in the background. The receivers that keep the caches true are connected on import.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from migrations_ops import selectors
from migrations_ops.models import ApiToken, Target
from migrations_ops.services.errors import TargetNotFound
from migrations_ops.services.observations import _read_live, observe_locks
from migrations_ops.services.targets import get_target
from opsconsole.cache import cache_reconnected

logger = logging.getLogger(__name__)


def _token_cache_key(token_hash: str) -> str:
    return f"api-token:{token_hash}"


# Every target's save or delete (flag changes included: they save the target) sets a new
# "targets version" in the shared cache, at once and again once committed. What is derived
# from the targets' rows (the flags documents, the list of targets) is kept under the version
# it was read at, in the shared cache and in this process's memory, so a request costs one
# round trip to Redis (the token and the version together) and a change is seen from the next
# request on. With a cache of this process only (no CACHE_URL, or its Redis unreachable: see
# opsconsole/cache.py) another process's change would not reach it: there the rows are read
# from the database instead (a flags document is keyed by the row's updated_at, a token read
# on each request).
TARGETS_VERSION_KEY = "targets-version"


def _cache_is_shared() -> bool:
    """Whether the cache is Redis, and reachable as far as this process knows."""
    backend = settings.CACHES["default"]["BACKEND"]
    return not backend.endswith("LocMemCache") and not getattr(cache, "degraded", False)


@receiver(cache_reconnected, dispatch_uid="api_caches_after_outage")
def _forget_what_the_outage_left_stale(sender, **kwargs) -> None:
    """Redis answers again after this process could not reach it: changes made meanwhile (by
    any process) did not reach it. A new targets version stops whatever was kept under the old
    one from being served, and the tokens revoked lately are forgotten (one remembered as
    active before its revoke would otherwise be accepted until its entry expires)."""
    cache.set(TARGETS_VERSION_KEY, time.time_ns(), None)
    # An entry is made at the latest just after its token's revoke, and lives at most
    # API_TOKEN_CACHE_SECONDS: only tokens revoked since then can have one left (a minute more
    # for the clocks of the hosts that revoked).
    since = timezone.now() - dt.timedelta(seconds=settings.API_TOKEN_CACHE_SECONDS + 60)
    revoked = ApiToken.objects.filter(revoked_at__gte=since).values_list("token_hash", flat=True)
    cache.delete_many([_token_cache_key(token_hash) for token_hash in revoked])


@receiver(post_save, sender=Target, dispatch_uid="api_caches_target_saved")
@receiver(post_delete, sender=Target, dispatch_uid="api_caches_target_deleted")
def _target_changed(sender, instance: Target, **kwargs) -> None:
    flags_changed(instance)


def flags_changed(target: Target | None = None) -> None:
    """Let the API serve ``target``'s new flags (and name, stage...) from the next request on:
    called for every save or delete of a target (the signal above)."""
    if not _cache_is_shared():
        return
    # Now and again once committed: a request between the two may have cached the old row.
    cache.set(TARGETS_VERSION_KEY, time.time_ns(), None)
    transaction.on_commit(lambda: cache.set(TARGETS_VERSION_KEY, time.time_ns(), None))


def targets_version(known: int | None = None) -> int:
    """The current targets version (``known``: as already read with the token)."""
    if known is not None:
        return known
    version = cache.get(TARGETS_VERSION_KEY)
    if version is None:
        cache.add(TARGETS_VERSION_KEY, time.time_ns(), None)
        version = cache.get(TARGETS_VERSION_KEY)
    return version


class _ProcessMemory:
    """Values derived from one targets version, kept in this process until the version
    changes (a dict per version: reads and writes of a dict are atomic for threads)."""

    def __init__(self) -> None:
        # One tuple, replaced whole: a thread never sees a new version with the old values.
        self.current: tuple = (None, {})

    def get(self, version, key):
        current_version, values = self.current
        return values.get(key) if version == current_version else None

    def set(self, version, key, value) -> None:
        current_version, values = self.current
        if version != current_version:
            values = {}
            self.current = (version, values)
        values[key] = value


_flags_memory = _ProcessMemory()
_targets_memory = _ProcessMemory()


@dataclass(frozen=True)
class FlagsDocument:
    """``GET /api/targets/<name>/flags`` as served: the JSON body, its ETag and how long an
    application may keep it (MIGRATION_CACHE_TTL)."""

    target_id: int
    body: bytes
    etag: str
    max_age: int


def flags_document(name: str, *, version: int | None = None) -> FlagsDocument:
    """The flags an application's auto-migrator obeys, with the target's name, its re-enable
    stage and when a flag last changed. TargetNotFound for an unknown name. ``version``: the
    targets version if already read (``authenticate_api_token_cached``)."""
    if not _cache_is_shared():
        updated_at = Target.objects.filter(name=name).values_list("updated_at", flat=True).first()
        if updated_at is None:
            raise TargetNotFound(f"unknown target {name!r}")
        key = f"flags:{updated_at.timestamp()}:{name}"
        document = cache.get(key)
        if document is None:
            document = _build_flags_document(get_target(name))
            cache.set(key, document, 3600)
        return document
    version = targets_version(version)
    document = _flags_memory.get(version, name)
    if document is None:
        key = f"flags:{version}:{name}"
        document = cache.get(key)
        if document is None:
            document = _build_flags_document(get_target(name))
            cache.set(key, document, 3600)
        _flags_memory.set(version, name, document)
    return document


def _build_flags_document(target: Target) -> FlagsDocument:
    last_change = target.flag_changes.order_by("-changed_at", "-id").first()
    body = json.dumps(
        {
            "target": target.name,
            "flags": selectors.flags_of(target),
            "stage": target.flag_stage,
            "changed_at": last_change.changed_at.isoformat() if last_change else None,
            "change_reason": last_change.reason if last_change else None,
        },
        sort_keys=True,
    ).encode()
    # A strong validator: the same bytes always give the same tag, any change a new one.
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return FlagsDocument(target.pk, body, etag, target.cache_ttl_seconds)


def target_ids_by_name(*, only=None, version: int | None = None) -> list[int]:
    """Every target's id in the order of their names (``only``: those among these ids)."""
    if _cache_is_shared():
        version = targets_version(version)
        ids = _targets_memory.get(version, "ids")
        if ids is None:
            ids = list(Target.objects.order_by("name").values_list("pk", flat=True))
            _targets_memory.set(version, "ids", ids)
    else:
        ids = list(Target.objects.order_by("name").values_list("pk", flat=True))
    return ids if only is None else [pk for pk in ids if pk in only]


# A target's status as the API reports it, kept for STATUS_MAX_AGE seconds: a monitor polling
# the status of 50 targets must not cost 50 connections a request. Kept in the shared cache and
# in this process's memory; each reading carries when it was made, so wherever it comes from
# its age is known and told. The shared entry outlives STATUS_MAX_AGE so that, while one
# request reads a target again, the others serve the reading before (with its age).
_status_memory: dict[int, dict] = {}


def _status_key(target_id: int) -> str:
    return f"status:{target_id}"


# Held by the request reading stale targets again.
STATUS_READING_KEY = "status-reading"


def target_status_reports(target_ids, *, live: bool = False) -> list[dict]:
    """The status report (selectors.status_report) of each target in ``target_ids``, from a
    reading at most STATUS_MAX_AGE seconds old, else read live now (all live with ``live``);
    each with ``read_at`` and ``reading_age_seconds``. In the order of ``target_ids``."""
    now, entries = _status_entries(target_ids, live=live)
    return [
        entry["report"]
        | {
            "read_at": entry["read_at_text"],
            "reading_age_seconds": round(max(now - entry["read_at"], 0.0), 1),
        }
        for entry in entries
    ]


def target_status_json(target_ids, *, live: bool = False) -> str:
    """``target_status_reports`` as a JSON array, put together from each reading's JSON as it
    was encoded when read (encoding 50 reports on every request would cost more than all else
    the request does)."""
    now, entries = _status_entries(target_ids, live=live)
    return (
        "["
        + ",".join(
            f'{entry["json"][:-1]},"read_at":"{entry["read_at_text"]}",'
            f'"reading_age_seconds":{round(max(now - entry["read_at"], 0.0), 1)}}}'
            for entry in entries
        )
        + "]"
    )


# How long this process serves a reading it found old while another request reads it again,
# before asking the shared cache whether the new one is there (not on every request).
STATUS_RECHECK_SECONDS = 0.25
_status_recheck_after: dict[int, float] = {}


def _status_entries(target_ids, *, live: bool) -> tuple[float, list[dict]]:
    target_ids = list(target_ids)
    max_age = settings.STATUS_MAX_AGE
    now = time.time()
    readings, missing = {}, []
    for pk in target_ids:
        entry = None if live else _status_memory.get(pk)
        if entry is not None and (
            now - entry["read_at"] <= max_age or now < _status_recheck_after.get(pk, 0)
        ):
            readings[pk] = entry
        else:
            missing.append(pk)
    if missing:
        readings |= _shared_or_live_readings(missing, live=live, now=now)
    # A target deleted while being read has no reading: it is left out.
    return time.time(), [readings[pk] for pk in target_ids if pk in readings]


def _shared_or_live_readings(target_ids: list[int], *, live: bool, now: float) -> dict:
    max_age = settings.STATUS_MAX_AGE
    cached = {} if live else cache.get_many([_status_key(pk) for pk in target_ids])
    readings, stale, unread = {}, {}, []
    for pk in target_ids:
        entry = cached.get(_status_key(pk))
        if entry is not None and now - entry["read_at"] <= max_age:
            readings[pk] = entry
        elif entry is None:
            unread.append(pk)
        else:
            stale[pk] = entry
    # Stale readings are read again by one request at a time (the others serve them meanwhile,
    # with their age): in a thread of its own when STATUS_READ_AGAIN_IN_BACKGROUND (this
    # request too answers with them, and no request waits for 50 targets), else before it
    # answers. A target never read, or ?live=1, is read by whoever asks, before answering.
    if stale and not cache.add(STATUS_READING_KEY, 1, _reading_lock_seconds()):
        _serve_meanwhile(stale, readings, now)
        stale = {}
    if stale and settings.STATUS_READ_AGAIN_IN_BACKGROUND:
        # Those half-way to stale too: the targets then age together, read in one batch.
        again = [*stale, *(pk for pk, e in readings.items() if now - e["read_at"] > max_age / 2)]
        _serve_meanwhile(stale, readings, now)
        threading.Thread(target=_read_again_in_background, args=(again,), daemon=True).start()
        stale = {}
    try:
        if stale or unread:
            readings |= _read_statuses([*stale, *unread])
    finally:
        if stale:
            cache.delete(STATUS_READING_KEY)
    _status_memory.update(readings)
    return readings


def _serve_meanwhile(stale: dict, readings: dict, now: float) -> None:
    readings |= stale
    for pk in stale:
        _status_recheck_after[pk] = now + STATUS_RECHECK_SECONDS


def _read_again_in_background(target_ids: list[int]) -> None:
    from django.db import connections

    try:
        # Spread over up to a quarter of STATUS_MAX_AGE: 50 connections opened at once would
        # take the CPU from the requests being answered meanwhile.
        pause = min(0.02, settings.STATUS_MAX_AGE / 4 / max(len(target_ids), 1))
        _status_memory.update(_read_statuses(target_ids, pause=pause))
    except Exception:
        logger.exception("could not read the status of targets %s again", target_ids)
    finally:
        cache.delete(STATUS_READING_KEY)
        connections.close_all()  # this thread's own connections to the console's database


def observe_targets() -> int:
    """Read every target's lock and books now (as the status endpoint would), so what the
    console shows stays current even when nobody asks; returns how many were read."""
    return len(_read_statuses(list(Target.objects.values_list("pk", flat=True))))


def _reading_lock_seconds() -> int:
    return settings.TARGET_CONNECT_TIMEOUT + settings.TARGET_STATEMENT_TIMEOUT + 5


def _read_statuses(target_ids: list[int], *, pause: float = 0) -> dict[int, dict]:
    readings = []
    for target in selectors.targets_with_observations().filter(pk__in=target_ids):
        if pause and readings:
            time.sleep(pause)
        readings.append((target, *_read_live(target), time.time()))
    observe_locks([(target, lock, error or "") for target, lock, _, error, _ in readings])
    entries = {}
    for target, _, applied, error, read_at in readings:
        report = selectors.status_report(target, applied, error)
        entries[target.pk] = {
            "read_at": read_at,
            "read_at_text": dt.datetime.fromtimestamp(read_at, dt.UTC).isoformat(),
            "report": report,
            "json": json.dumps(report, cls=DjangoJSONEncoder),  # as JsonResponse encodes
        }
    keep = max(settings.STATUS_MAX_AGE * 12, 60)
    cache.set_many({_status_key(pk): entry for pk, entry in entries.items()}, keep)
    return entries
