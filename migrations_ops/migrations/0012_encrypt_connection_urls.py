"""Target connection URLs are stored encrypted with TARGET_SECRET_KEY (migrations_ops/fields.py):
the field changes, and the URLs already stored are encrypted."""

from django.db import migrations

import migrations_ops.fields
import migrations_ops.models


def encrypt_urls(apps, schema_editor):
    # The field now reads a plain value as it is and writes it encrypted.
    target_model = apps.get_model("migrations_ops", "Target")
    for pk, url in target_model.objects.values_list("pk", "connection_url"):
        target_model.objects.filter(pk=pk).update(connection_url=url)


def decrypt_urls(apps, schema_editor):
    target_model = apps.get_model("migrations_ops", "Target")
    table = schema_editor.quote_name(target_model._meta.db_table)
    for pk, url in target_model.objects.values_list("pk", "connection_url"):
        # Around the field, which would encrypt it again.
        schema_editor.execute(
            f"UPDATE {table} SET connection_url = %s WHERE id = %s",  # noqa: S608
            [url, pk],
        )


class Migration(migrations.Migration):
    dependencies = [
        ("migrations_ops", "0011_audit_chain"),
    ]

    operations = [
        migrations.AlterField(
            model_name="target",
            name="connection_url",
            field=migrations_ops.fields.EncryptedTextField(
                validators=[migrations_ops.models.validate_target_url]
            ),
        ),
        migrations.RunPython(encrypt_urls, decrypt_urls),
    ]
