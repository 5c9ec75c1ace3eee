"""Console admins see and lift login lock-outs (django-axes) and manage TOTP devices
(django-otp): migrations_ops/roles.py."""

from django.db import migrations

from migrations_ops.roles import sync_roles


def update_roles(apps, schema_editor):
    sync_roles(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("incidents", "0010_flag_history_append_only_roles"),
        ("axes", "0010_accessattemptexpiration"),
        ("otp_totp", "0003_add_timestamps"),
    ]

    operations = [migrations.RunPython(update_roles, migrations.RunPython.noop)]
