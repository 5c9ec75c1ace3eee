"""On PostgreSQL the database itself refuses UPDATE and DELETE on audit events."""

from django.db import migrations

from opsconsole.append_only import append_only


class Migration(migrations.Migration):
    dependencies = [("migrations_ops", "0001_initial")]

    operations = [append_only("migrations_ops_auditevent", "audit events")]
