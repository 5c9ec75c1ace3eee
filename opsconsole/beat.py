"""Celery beat's scheduler (CELERY_BEAT_SCHEDULER): django-celery-beat's, except that a task
declared with ``runs_in_beat=True`` is run here, in beat's own process, instead of being sent
to the workers.

That is for the sweeper (``migrations_ops.sweep_operations``): it marks lost the operations of
workers that died. Sent to the queue, it waited for a worker, so with the only worker dead
nothing was ever marked lost. Two beats running at once are harmless: every change the sweep
makes is a conditional update (see ``services.sweep_operations``).
"""

from __future__ import annotations

import uuid

from django.db import close_old_connections
from django_celery_beat.schedulers import DatabaseScheduler

from opsconsole import middleware


class ConsoleScheduler(DatabaseScheduler):
    def apply_async(self, entry, producer=None, advance=True, **kwargs):
        task = self.app.tasks.get(entry.task)
        if not getattr(task, "runs_in_beat", False):
            return super().apply_async(entry, producer=producer, advance=advance, **kwargs)
        entry = self.reserve(entry) if advance else entry
        try:
            return run_in_beat(task, entry.args, entry.kwargs)
        finally:
            # What the base class does after sending: write the entries' last run in time.
            self._tasks_since_sync += 1
            if self.should_sync():
                self._do_sync()


def run_in_beat(task, args=(), kwargs=None):
    """Run ``task`` in this process, as a worker would run it: the console's connection
    checked before and after (Django's rules, as around a web request), the audit events it
    writes carrying its task id as their request id. Celery logs how it went, a failure with
    its traceback, which is not raised: beat goes on with its schedule. Returns the task's
    EagerResult."""
    task_id = str(uuid.uuid4())
    close_old_connections()
    middleware.bind_task(task_id)
    try:
        result = task.apply(args or (), kwargs or {}, task_id=task_id, throw=False)
    finally:
        middleware.unbind_task()
        close_old_connections()
    return result
