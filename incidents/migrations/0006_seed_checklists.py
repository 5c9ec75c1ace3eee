"""Every incident has the runbook's validation checklist: give the incidents opened before it
existed theirs (all pending), and the roles the checklist's permissions."""

from django.db import migrations

from migrations_ops.roles import sync_roles

# incidents.models.CHECKLIST_KEYS as they stood when the checklist was added.
KEYS = [
    "auto_migrate",
    "no_stuck_locks",
    "tracking_consistent",
    "api_responding",
    "monitoring_normal",
    "no_migration_attempts",
]


def seed(apps, schema_editor):
    incident_model = apps.get_model("incidents", "Incident")
    item_model = apps.get_model("incidents", "ChecklistItem")
    for incident in incident_model.objects.order_by("pk").iterator():
        have = set(item_model.objects.filter(incident=incident).values_list("key", flat=True))
        item_model.objects.bulk_create(
            item_model(incident=incident, key=key) for key in KEYS if key not in have
        )


def update_roles(apps, schema_editor):
    sync_roles(apps)


class Migration(migrations.Migration):
    dependencies = [("incidents", "0005_checklist")]

    operations = [
        migrations.RunPython(seed, migrations.RunPython.noop),
        migrations.RunPython(update_roles, migrations.RunPython.noop),
    ]
