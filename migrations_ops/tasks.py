"""Celery tasks: thin wrappers that call services."""

from celery import shared_task

from migrations_ops import services


@shared_task(bind=True, name="migrations_ops.execute_operation", acks_late=True)
def execute_operation_task(self, operation_id: int) -> str | None:
    operation = services.execute_operation(operation_id, worker=self.request.hostname or "")
    return operation.status if operation else None


# runs_in_beat: beat runs it in its own process (opsconsole.beat), not on a worker, so that
# the operations of a dead worker are marked lost even when no worker is left to run it.
@shared_task(name="migrations_ops.sweep_operations", runs_in_beat=True)
def sweep_operations_task() -> dict:
    """Run by Celery beat every OPERATION_SWEEP_INTERVAL seconds (``make beat``)."""
    return services.sweep_operations().as_dict()


@shared_task(name="migrations_ops.observe_targets")
def observe_targets_task() -> int:
    """Run by Celery beat every LOCK_OBSERVE_INTERVAL seconds (``make beat``)."""
    return services.observe_targets()
