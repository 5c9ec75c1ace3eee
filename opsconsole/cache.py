"""Django's Redis cache, minus two costs on every command.

Django's client builds a new ``redis.Redis`` object for each command (over 150 response
callbacks registered each time: a third of a millisecond, more than the round trip to Redis).
A ``redis.Redis`` object is safe to share between threads and holds nothing but its connection
pool, so one per pool is kept and reused.

Django also checks every key against memcached's limits (length, control characters: a loop
over each character), only to warn: Redis takes any key, so the check is left out.

``DegradingRedisCache`` (the console's) also carries on when Redis cannot be reached: the
applications read their kill switches exactly when infrastructure is failing.
"""

import logging
import threading
import time

from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from django.dispatch import Signal
from redis.exceptions import RedisError

from migrations_ops.engine import mask_url

logger = logging.getLogger(__name__)

# Sent (with ``outage_seconds``) when a DegradingRedisCache reaches Redis again after failing
# to: whatever this process or another changed meanwhile did not reach Redis.
cache_reconnected = Signal()


class KeptRedisCacheClient(RedisCacheClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clients = {}

    def get_client(self, key=None, *, write=False):
        pool = self._get_connection_pool(write)
        client = self._clients.get(id(pool))
        if client is None:
            client = self._clients[id(pool)] = self._client(connection_pool=pool)
        return client


class KeptClientRedisCache(RedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = KeptRedisCacheClient

    def validate_key(self, key):
        pass


class _ProcessStore(LocMemCache):
    """What this process keeps while Redis cannot be reached (keys as Redis would take them)."""

    def validate_key(self, key):
        pass


class _Breaker:
    """Whether Redis is worth asking: after a failure, not again for ``retry_seconds`` (then
    one caller tries while the others go on without it), so a dead Redis costs one time-out
    every few seconds, not one per request. One per Redis location and process, shared by the
    threads (Django gives each thread a cache object of its own)."""

    def __init__(self, retry_seconds: float) -> None:
        self.retry_seconds = retry_seconds
        self.down_since: float | None = None  # None: Redis is taken to be up
        self.retry_at = 0.0
        self.lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.down_since is not None

    def may_try(self) -> bool:
        """Closed, or open and due for a try (taken by this caller alone)."""
        if self.down_since is None:
            return True
        with self.lock:
            now = time.monotonic()
            if self.down_since is None or now >= self.retry_at:
                self.retry_at = now + self.retry_seconds
                return True
            return False

    def opened(self) -> bool:
        """Note a failure; True if Redis was taken to be up until now (a new outage)."""
        with self.lock:
            self.retry_at = time.monotonic() + self.retry_seconds
            if self.down_since is None:
                self.down_since = time.monotonic()
                return True
            return False

    def closed(self) -> float | None:
        """Note a success; how long the outage lasted if one just ended, else None."""
        with self.lock:
            if self.down_since is None:
                return None
            lasted, self.down_since = time.monotonic() - self.down_since, None
            return lasted


_breakers: dict[tuple, _Breaker] = {}
_breakers_lock = threading.Lock()


class DegradingRedisCache(KeptClientRedisCache):
    """``KeptClientRedisCache`` that carries on when Redis cannot be reached.

    A command that fails (Redis down, refusing, too slow: short socket time-outs, settings
    CACHE_SOCKET_TIMEOUT) is answered by this process's own store instead -- a miss at first,
    then what this process wrote since -- and Redis is not asked again for RETRY_SECONDS. The
    outage is logged once when it starts and once when it ends. When Redis answers again the
    process's store is emptied and ``cache_reconnected`` is sent *before* the command is run, so
    its receivers can drop what went stale in Redis meanwhile (writes made during the outage
    never reached it). ``degraded`` says whether the cache is the process's own right now: what
    must be the same for every process (a revoked token, a changed flag) is then read from the
    database instead (see migrations_ops.services).
    """

    def __init__(self, server, params):
        super().__init__(server, params)
        self._location = ",".join(mask_url(server) for server in self._servers)
        retry_seconds = float(params.get("RETRY_SECONDS", 5))
        with _breakers_lock:
            self._breaker = _breakers.setdefault(
                (tuple(self._servers), self.key_prefix), _Breaker(retry_seconds)
            )
            self._breaker.retry_seconds = retry_seconds
        self._local = _ProcessStore(
            f"opsconsole-cache-outage:{self._location}:{self.key_prefix}",
            {**params, "OPTIONS": {"MAX_ENTRIES": int(params.get("PROCESS_MAX_ENTRIES", 2000))}},
        )

    @property
    def degraded(self) -> bool:
        return self._breaker.is_open

    def _either(self, name: str, *args, **kwargs):
        breaker = self._breaker
        if not breaker.may_try():
            return getattr(self._local, name)(*args, **kwargs)
        try:
            if breaker.is_open:
                self._cache.get_client().ping()  # reconnected before anything else is asked
                self._back()
            return getattr(super(), name)(*args, **kwargs)
        except RedisError as error:
            if breaker.opened():
                self._local.clear()
                logger.warning(
                    "the cache's Redis at %s cannot be reached (%s): this process answers "
                    "from its own memory and the database, and tries Redis again every %g s",
                    self._location,
                    error,
                    breaker.retry_seconds,
                )
            return getattr(self._local, name)(*args, **kwargs)

    def _back(self) -> None:
        lasted = self._breaker.closed()
        if lasted is None:
            return
        self._local.clear()
        logger.warning("the cache's Redis at %s answers again after %.1f s", self._location, lasted)
        for receiver, response in cache_reconnected.send_robust(self, outage_seconds=lasted):
            if isinstance(response, Exception):
                logger.error(
                    "%s could not drop what went stale in the cache during the outage: %s",
                    receiver.__qualname__,
                    response,
                )

    def add(self, *args, **kwargs):
        return self._either("add", *args, **kwargs)

    def get(self, *args, **kwargs):
        return self._either("get", *args, **kwargs)

    def set(self, *args, **kwargs):
        return self._either("set", *args, **kwargs)

    def touch(self, *args, **kwargs):
        return self._either("touch", *args, **kwargs)

    def delete(self, *args, **kwargs):
        return self._either("delete", *args, **kwargs)

    def get_many(self, *args, **kwargs):
        return self._either("get_many", *args, **kwargs)

    def has_key(self, *args, **kwargs):
        return self._either("has_key", *args, **kwargs)

    def incr(self, *args, **kwargs):
        return self._either("incr", *args, **kwargs)

    def set_many(self, *args, **kwargs):
        return self._either("set_many", *args, **kwargs)

    def delete_many(self, *args, **kwargs):
        return self._either("delete_many", *args, **kwargs)

    def clear(self, *args, **kwargs):
        return self._either("clear", *args, **kwargs)
