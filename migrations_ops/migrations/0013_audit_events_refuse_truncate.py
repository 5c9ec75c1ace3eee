"""TRUNCATE passed the append-only trigger (row triggers never fire for it): a statement-level
trigger refuses it too (opsconsole/append_only.py)."""

from django.db import migrations

from opsconsole.append_only import truncate_refused


class Migration(migrations.Migration):
    dependencies = [("migrations_ops", "0012_encrypt_connection_urls")]

    operations = [truncate_refused("migrations_ops_auditevent")]
