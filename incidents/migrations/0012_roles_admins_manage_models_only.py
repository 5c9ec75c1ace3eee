"""Console admins hold only the add/change/delete/view permissions of the models they manage,
not the console's own action permissions that happen to start with the same words (such as
``change_flags``): migrations_ops/roles.py."""

from django.db import migrations

from migrations_ops.roles import sync_roles


def update_roles(apps, schema_editor):
    sync_roles(apps)


class Migration(migrations.Migration):
    dependencies = [("incidents", "0011_roles_login_records_totp_devices")]

    operations = [migrations.RunPython(update_roles, migrations.RunPython.noop)]
