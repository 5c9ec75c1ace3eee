"""Celery tasks: thin wrappers that call services."""

from celery import shared_task

from incidents import services
from incidents.models import Drill
from migrations_ops.actors import Actor
from migrations_ops.refusals import record_refusal


@shared_task(name="incidents.tasks.run_scheduled_drill")
def run_scheduled_drill(drill_id: int) -> str | None:
    """Started by Celery beat (the drill's periodic task); a disabled or deleted drill is
    skipped."""
    drill = Drill.objects.select_related("target").filter(pk=drill_id, enabled=True).first()
    if drill is None:
        return None
    actor = Actor.worker("drill-schedule")
    try:
        run = services.run_drill(actor=actor, drill=drill, scheduled=True)
    except services.ServiceError as refusal:
        record_refusal(actor, "drill.run_scheduled", refusal, subject=drill)
        return f"refused: {refusal}"
    return run.status


@shared_task(name="incidents.tasks.run_drill")
def run_drill_task(run_id: int) -> str:
    """A run started from the admin (``services.request_drill``), already written."""
    return services.perform_drill_run(run_id).status
