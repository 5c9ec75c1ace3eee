"""On PostgreSQL the database itself refuses UPDATE and DELETE on timeline entries."""

from django.db import migrations

from opsconsole.append_only import append_only


class Migration(migrations.Migration):
    dependencies = [("incidents", "0002_seed_recovery_objectives")]

    operations = [append_only("incidents_timelineentry", "timeline entries")]
