"""Console admins also manage the schedules kept by django-celery-beat (migrations_ops/roles.py)."""

from django.db import migrations

from migrations_ops.roles import sync_roles


def update_roles(apps, schema_editor):
    sync_roles(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("migrations_ops", "0006_history_indexes"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(update_roles, migrations.RunPython.noop)]
