"""What the console's model admins share: the read-only admin of history and JSON shown as is."""

from __future__ import annotations

import json

from django.contrib import admin
from django.utils.html import format_html


def pretty_json(value) -> str:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, sort_keys=True, default=str))


class ReadOnlyAdmin(admin.ModelAdmin):
    """History is never edited through the admin."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
