"""Migration scripts in the admin: read-only, for they change only through ``ops import``."""

from __future__ import annotations

from django.contrib import admin

from migrations_ops.admin.common import ReadOnlyAdmin
from migrations_ops.models import MigrationScript


@admin.register(MigrationScript)
class MigrationScriptAdmin(ReadOnlyAdmin):
    """Scripts change only through ``ops import``, which keeps applied SQL from being replaced."""

    list_display = [
        "target",
        "version",
        "filename",
        "layout",
        "transactional",
        "short_checksum",
        "drift",
        "imported_at",
    ]
    list_filter = ["target", "layout", "transactional"]
    search_fields = ["filename", "target__name"]
    list_select_related = ["target"]
    fields = [
        "target",
        "version",
        "name",
        "filename",
        "layout",
        "transactional",
        "needs_no_transaction",
        "checksum",
        "imported_at",
        "drift_checksum",
        "drift_detected_at",
        "up_sql",
        "down_sql",
    ]
    readonly_fields = fields

    @admin.display(description="Checksum")
    def short_checksum(self, obj):
        return obj.checksum[:12]

    @admin.display(description="Drift", boolean=True)
    def drift(self, obj):
        return bool(obj.drift_checksum)
