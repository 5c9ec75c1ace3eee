"""The fleet view's alert thresholds in the admin: one row, changed through ``services``."""

from __future__ import annotations

from django.contrib import admin

from migrations_ops import selectors, services
from migrations_ops.actors import Actor
from migrations_ops.models import AlertThresholds, Door


@admin.register(AlertThresholds)
class AlertThresholdsAdmin(admin.ModelAdmin):
    """One row: the thresholds the fleet view applies. Changes are audited."""

    list_display = ["__str__", "updated_at"]
    fields = ["lock_held_seconds", "failure_rate", "retry_rate"]

    def has_add_permission(self, request):
        return super().has_add_permission(request) and not AlertThresholds.objects.exists()

    def has_delete_permission(self, request, obj=None):
        return False

    def get_changeform_initial_data(self, request):
        current = selectors.AlertThresholds.from_settings()
        return {
            "lock_held_seconds": current.lock_held_seconds,
            "failure_rate": current.failure_rate,
            "retry_rate": current.retry_rate,
        }

    def save_model(self, request, obj, form, change):
        services.save_alert_thresholds(
            actor=Actor.for_user(request.user, Door.ADMIN),
            thresholds=obj,
            changed=form.changed_data,
        )
