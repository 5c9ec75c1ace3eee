"""Incident commanders get the incidents app's permissions, auditors its views
(migrations_ops/roles.py)."""

from django.db import migrations

from migrations_ops.roles import sync_roles


def update_roles(apps, schema_editor):
    sync_roles(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("incidents", "0003_timeline_append_only_trigger"),
        ("migrations_ops", "0008_alert_thresholds"),
    ]

    operations = [migrations.RunPython(update_roles, migrations.RunPython.noop)]
