"""Flag changes are append-only like audit events; on-call engineers change flags and run
drills, console admins manage API tokens and drill schedules (migrations_ops/roles.py)."""

from django.db import migrations

from migrations_ops.roles import sync_roles
from opsconsole.append_only import append_only


def update_roles(apps, schema_editor):
    sync_roles(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("incidents", "0009_drills"),
        ("migrations_ops", "0010_flags_and_api_tokens"),
    ]

    operations = [
        append_only("migrations_ops_flagchange", "flag changes"),
        migrations.RunPython(update_roles, migrations.RunPython.noop),
    ]
