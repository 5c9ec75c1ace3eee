"""The runbook's escalation path and communication channels as editable contacts; addenda
append-only in PostgreSQL like the timeline; roles get the new models' permissions."""

from django.db import migrations

from migrations_ops.roles import sync_roles
from opsconsole.append_only import append_only

# rollback-runbook.md, "Escalation Path" and "Communication Channels".
RUNBOOK_CONTACTS = [
    (1, "On-call engineer", "PagerDuty: migration-failures\nSlack: #incidents"),
    (2, "Database team", "Email: database-team@example.com\nSlack: #incidents"),
    (3, "Platform team", "Slack: #incidents"),
    (4, "Incident commander", "Slack: #incidents\nPagerDuty: migration-failures"),
]


def seed_contacts(apps, schema_editor):
    contact = apps.get_model("incidents", "EscalationContact")
    for level, team, reaches in RUNBOOK_CONTACTS:
        contact.objects.get_or_create(level=level, defaults={"team": team, "reaches": reaches})


def update_roles(apps, schema_editor):
    sync_roles(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("incidents", "0007_action_items_addenda_escalation_contacts"),
        ("migrations_ops", "0009_operation_incident_target_health_url"),
    ]

    operations = [
        migrations.RunPython(seed_contacts, migrations.RunPython.noop),
        append_only("incidents_postmortemaddendum", "post-mortem addenda"),
        migrations.RunPython(update_roles, migrations.RunPython.noop),
    ]
