"""The Celery application. Configuration comes from Django settings (``CELERY_*``)."""

from __future__ import annotations

import gc
import os
from typing import TYPE_CHECKING

from celery import Celery
from celery.signals import (
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)

if TYPE_CHECKING:
    from migrations_ops.services import WorkerLivenessBeat

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "opsconsole.settings")

app = Celery("opsconsole")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
@task_postrun.connect
def close_old_database_connections(sender=None, **kwargs) -> None:
    """Around each task, what Django does around each web request: close the console's
    connection if it had an error or is older than CONN_MAX_AGE, else keep it for the next task
    (checked before reuse, CONN_HEALTH_CHECKS). Not for a task run in-process (eager): its
    connection, and any transaction on it, belong to the caller."""
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return
    from django.db import close_old_connections

    close_old_connections()


@task_prerun.connect
def bind_task_request_id(sender=None, task_id=None, **kwargs) -> None:
    """The task's id is the request id of the audit events it writes; a task run in-process
    (eager) keeps its caller's (opsconsole.middleware)."""
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return
    from opsconsole import middleware

    middleware.bind_task(task_id or "")


@task_postrun.connect
def unbind_task_request_id(sender=None, **kwargs) -> None:
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return
    from opsconsole import middleware

    middleware.unbind_task()


@worker_ready.connect
@worker_process_init.connect
def freeze_start_up_objects(**kwargs) -> None:
    """What is alive once the worker (or a pool process) has started lives as long as the
    process: keep the garbage collector's full collections from walking it all again (a full
    collection of a started Django process takes tens of milliseconds)."""
    gc.freeze()


# This worker's liveness heartbeat (services.WorkerLivenessBeat), while it runs.
_liveness_beats: dict[str, WorkerLivenessBeat] = {}


@worker_ready.connect
def start_liveness_heartbeat(sender=None, **kwargs) -> None:
    """Once the worker consumes its queues, record that it is alive, and keep recording it: the
    console says when no worker has been seen for WORKER_SEEN_WITHIN seconds."""
    from migrations_ops import services

    hostname = sender.hostname
    if hostname in _liveness_beats:
        return  # ready again after a lost broker connection: already beating
    beat = services.WorkerLivenessBeat(hostname, sorted(sender.app.amqp.queues.consume_from))
    _liveness_beats[hostname] = beat
    beat.start()


@worker_shutdown.connect
def stop_liveness_heartbeat(sender=None, **kwargs) -> None:
    beat = _liveness_beats.pop(getattr(sender, "hostname", ""), None)
    if beat is not None:
        beat.stop()
