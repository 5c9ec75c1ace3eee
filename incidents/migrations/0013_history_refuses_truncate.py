"""TRUNCATE passed the append-only triggers of the flag history, incident timelines and
post-mortem addenda (row triggers never fire for it): statement-level triggers refuse it too
(opsconsole/append_only.py)."""

from django.db import migrations

from opsconsole.append_only import truncate_refused


class Migration(migrations.Migration):
    dependencies = [
        ("incidents", "0012_roles_admins_manage_models_only"),
        ("migrations_ops", "0013_audit_events_refuse_truncate"),
    ]

    operations = [
        truncate_refused("migrations_ops_flagchange"),
        truncate_refused("incidents_timelineentry"),
        truncate_refused("incidents_postmortemaddendum"),
    ]
