"""History rows (audit events, incident timelines, post-mortem addenda) are append-only: the
models refuse to change or delete a saved row, and on PostgreSQL triggers refuse it too: one
per row for UPDATE and DELETE (``append_only``), one per statement for TRUNCATE, which row
triggers never see (``truncate_refused``)."""

from django.db import migrations, models


class AppendOnlyError(Exception):
    pass


class AppendOnlyModel(models.Model):
    """Rows are added, never changed or deleted; the error names the rows by their plural."""

    class Meta:
        abstract = True

    def save(self, *args, **kwargs):
        if self.pk is not None and not self._state.adding:
            raise AppendOnlyError(f"{self._meta.verbose_name_plural} are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AppendOnlyError(f"{self._meta.verbose_name_plural} are append-only")


def append_only(table: str, what: str) -> migrations.RunPython:
    """The PostgreSQL trigger, as a migration operation (other databases rely on the models).
    ``what`` names the rows in the error, e.g. ``"audit events"``."""
    function = f"opsconsole_refuse_{table}_change"
    trigger = f"{table}_append_only"
    create = f"""
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '{what} are append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER {trigger}
    BEFORE UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}();
"""
    drop = f"""
DROP TRIGGER IF EXISTS {trigger} ON {table};
DROP FUNCTION IF EXISTS {function}();
"""

    return migrations.RunPython(_on_postgresql(create), _on_postgresql(drop))


def truncate_refused(table: str) -> migrations.RunPython:
    """A statement-level trigger refusing TRUNCATE of ``table``, with the function its
    ``append_only`` trigger calls (which must exist: the error reads the same)."""
    function = f"opsconsole_refuse_{table}_change"
    trigger = f"{table}_no_truncate"
    create = f"""
CREATE TRIGGER {trigger}
    BEFORE TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {function}();
"""
    drop = f"DROP TRIGGER IF EXISTS {trigger} ON {table};"
    return migrations.RunPython(_on_postgresql(create), _on_postgresql(drop))


def _on_postgresql(sql: str):
    def operation(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql, params=None)

    return operation
