"""On PostgreSQL the database itself refuses UPDATE and DELETE on timeline entries."""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION opsconsole_refuse_timeline_change() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'timeline entries are append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER incidents_timelineentry_append_only
    BEFORE UPDATE OR DELETE ON incidents_timelineentry
    FOR EACH ROW EXECUTE FUNCTION opsconsole_refuse_timeline_change();
"""

DROP = """
DROP TRIGGER IF EXISTS incidents_timelineentry_append_only ON incidents_timelineentry;
DROP FUNCTION IF EXISTS opsconsole_refuse_timeline_change();
"""


def create_trigger(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE, params=None)


def drop_trigger(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):
    dependencies = [("incidents", "0002_seed_recovery_objectives")]

    operations = [migrations.RunPython(create_trigger, drop_trigger)]
