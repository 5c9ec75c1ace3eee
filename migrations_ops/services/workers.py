"""Worker liveness: each Celery worker's row, written while it runs and forgotten once silent.

Process state owned here: ``WorkerLivenessBeat``, the thread that writes a worker's row
while the worker runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
from collections.abc import Sequence

from django.conf import settings
from django.db import connection as console_connection
from django.utils import timezone

from migrations_ops.models import WorkerHeartbeat

logger = logging.getLogger(__name__)


# How long a worker's row is kept once it has fallen silent (a renamed or removed worker).
WORKER_ROWS_KEPT = dt.timedelta(days=7)


def record_worker_alive(
    hostname: str, *, queues: Sequence[str], pid: int | None, now: dt.datetime | None = None
) -> None:
    """The worker ``hostname`` is alive now (see models.WorkerHeartbeat). A worker seen again
    after it stopped, or after a silence, counts as started anew."""
    now = now or timezone.now()
    silence = dt.timedelta(seconds=settings.WORKER_SEEN_WITHIN)
    fields = {"queues": sorted(queues), "pid": pid, "last_seen_at": now, "stopped_at": None}
    kept = WorkerHeartbeat.objects.filter(
        hostname=hostname, stopped_at__isnull=True, last_seen_at__gte=now - silence
    ).update(**fields)
    if not kept:
        WorkerHeartbeat.objects.update_or_create(
            hostname=hostname, defaults={**fields, "started_at": now}
        )


def record_worker_stopped(hostname: str, now: dt.datetime | None = None) -> None:
    """The worker shut down cleanly: it is not alive any more, though seen a moment ago."""
    now = now or timezone.now()
    WorkerHeartbeat.objects.filter(hostname=hostname).update(last_seen_at=now, stopped_at=now)


def forget_silent_workers(now: dt.datetime | None = None) -> int:
    now = now or timezone.now()
    deleted, _ = WorkerHeartbeat.objects.filter(last_seen_at__lt=now - WORKER_ROWS_KEPT).delete()
    return deleted


class WorkerLivenessBeat:
    """In a worker's main process: records that the worker is alive at once and then every
    WORKER_HEARTBEAT_SECONDS, from a thread of its own with its own connection to the console's
    database, so a task holding the process (a solo pool) does not silence it."""

    def __init__(self, hostname: str, queues: Sequence[str]):
        self.hostname, self.queues = hostname, list(queues)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="worker-liveness-heartbeat", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and record the worker stopped."""
        self._stop.set()
        self._thread.join(timeout=settings.WORKER_HEARTBEAT_SECONDS + 5)
        with contextlib.suppress(Exception):  # shutting down: the silence will tell anyway
            record_worker_stopped(self.hostname)

    def _run(self) -> None:
        try:
            with contextlib.suppress(Exception):
                forget_silent_workers()
            while True:
                try:
                    record_worker_alive(self.hostname, queues=self.queues, pid=os.getpid())
                except Exception as error:  # the console's database away for a moment
                    logger.warning("worker %s: liveness not recorded: %s", self.hostname, error)
                    console_connection.close()
                if self._stop.wait(settings.WORKER_HEARTBEAT_SECONDS):
                    return
        finally:
            console_connection.close()
