"""The console's groups (see migrations_ops/roles.py), and the two-person rule on for the
production targets that exist already."""

from django.db import migrations

from migrations_ops.roles import sync_roles


def create_roles(apps, schema_editor):
    sync_roles(apps)


def require_approval_in_production(apps, schema_editor):
    apps.get_model("migrations_ops", "Target").objects.filter(environment="production").update(
        requires_approval=True
    )


class Migration(migrations.Migration):
    dependencies = [
        ("migrations_ops", "0004_two_person_rule"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.RunPython(create_roles, migrations.RunPython.noop),
        migrations.RunPython(require_approval_in_production, migrations.RunPython.noop),
    ]
