"""On PostgreSQL the database itself refuses UPDATE and DELETE on audit events."""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION opsconsole_refuse_audit_change() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER migrations_ops_auditevent_append_only
    BEFORE UPDATE OR DELETE ON migrations_ops_auditevent
    FOR EACH ROW EXECUTE FUNCTION opsconsole_refuse_audit_change();
"""

DROP = """
DROP TRIGGER IF EXISTS migrations_ops_auditevent_append_only ON migrations_ops_auditevent;
DROP FUNCTION IF EXISTS opsconsole_refuse_audit_change();
"""


def create_trigger(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE, params=None)


def drop_trigger(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):
    dependencies = [("migrations_ops", "0001_initial")]

    operations = [migrations.RunPython(create_trigger, drop_trigger)]
