"""Model rows read, inserted and updated with plain SQL, for the statements every operation runs.

On an operation's path (request, claim, run, finish) the ORM's query compiling and row building
cost more than the small queries themselves: measured by bench/rollback_overhead.py, loading one
migration script through ``QuerySet.values()`` took 0.6-1.1 ms, the same SELECT through the
cursor 0.2 ms. These helpers keep the models' own table and column names and the fields' own
conversions from and to the database (the ones the compiler applies: JSON decoded, SQLite's
integers as booleans, its text as datetimes), so what they read and write is what the ORM would.
Writes through them send no model signals: use them for models that have no receivers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.models import Model

Converter = Callable[[Any, Any, Any], Any]


def quoted(model: type[Model], name: str | None = None) -> str:
    """The model's table, or the column of its field ``name``, quoted for SQL."""
    return _quoted(model, name, connection.vendor)


def columns(model: type[Model], table: str | None = None) -> str:
    """Every column of ``model`` (of ``table``, an alias, if given), in the order
    ``instance`` takes them."""
    return _columns(model, table, connection.vendor)


@functools.cache
def _quoted(model: type[Model], name: str | None, vendor: str) -> str:
    if name is None:
        return connection.ops.quote_name(model._meta.db_table)
    return connection.ops.quote_name(model._meta.get_field(name).column)


@functools.cache
def _columns(model: type[Model], table: str | None, vendor: str) -> str:
    prefix = f"{connection.ops.quote_name(table)}." if table else ""
    return ", ".join(
        prefix + _quoted(model, field.name, vendor) for field in model._meta.concrete_fields
    )


def select(
    model: type[Model], fields: Sequence[str], where: str, params: Sequence[Any]
) -> list[tuple]:
    """``fields`` (names) of the rows of ``model`` ``where`` (SQL after WHERE, with ``%s``
    placeholders; ORDER BY may follow), converted as the ORM converts them."""
    names = ", ".join(quoted(model, name) for name in fields)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {names} FROM {quoted(model)} WHERE {where}", params)  # noqa: S608 (quoted names)
        rows = cursor.fetchall()
    return [convert(model, fields, row) for row in rows]


def instances(model: type[Model], where: str, params: Sequence[Any]) -> list[Model]:
    """The rows of ``model`` ``where`` (as in ``select``), as model instances."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {columns(model)} FROM {quoted(model)} WHERE {where}", params)  # noqa: S608 (quoted names)
        rows = cursor.fetchall()
    return [instance(model, row) for row in rows]


def instance(model: type[Model], row: Sequence[Any]) -> Model:
    """A model instance from ``row``: every column (``columns``) as the database returns it."""
    fields = model._meta.concrete_fields
    values = convert(model, [field.name for field in fields], row)
    return model.from_db(connection.alias, [field.attname for field in fields], values)


def insert(instance: Model, *, using: str = DEFAULT_DB_ALIAS) -> Model:
    """Insert ``instance`` as ``Model.save()`` would a new row (fields' ``pre_save`` and
    conversions; its key from the database), without the model's signals."""
    database = connections[using]
    fields, statement = _insert(type(instance), instance.pk is None, using)
    values = [field.get_db_prep_save(field.pre_save(instance, True), database) for field in fields]
    with database.cursor() as cursor:
        cursor.execute(statement, values)
        instance.pk = cursor.fetchone()[0]
    instance._state.adding = False
    instance._state.db = using
    return instance


@functools.cache
def _insert(model: type[Model], key_from_database: bool, using: str) -> tuple[list, str]:
    """The fields ``insert`` writes and its INSERT ... RETURNING the key."""
    meta = model._meta
    fields = [f for f in meta.concrete_fields if not (f.primary_key and key_from_database)]
    quote = connections[using].ops.quote_name
    return fields, (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "  # noqa: S608 (quoted names)
        f"VALUES ({', '.join(['%s'] * len(fields))}) RETURNING {quote(meta.pk.column)}"
    )


def update(model: type[Model], values: dict[str, Any], where: str, params: Sequence[Any]) -> int:
    """Set ``values`` (field name: value) on the rows of ``model`` ``where`` (as in
    ``select``); returns how many rows were changed."""
    assignments = ", ".join(f"{quoted(model, name)} = %s" for name in values)
    prepared = [
        model._meta.get_field(name).get_db_prep_save(value, connection)
        for name, value in values.items()
    ]
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {quoted(model)} SET {assignments} WHERE {where}",  # noqa: S608 (quoted names)
            [*prepared, *params],
        )
        return cursor.rowcount


def convert(model: type[Model], fields: Sequence[str], row: Sequence[Any]) -> tuple:
    converted = []
    for name, value in zip(fields, row, strict=True):
        column, converters = _converters(model, name, connection.vendor)
        for converter in converters:
            value = converter(value, column, connection)
        converted.append(value)
    return tuple(converted)


@functools.cache
def _converters(model: type[Model], name: str, vendor: str) -> tuple[Any, tuple[Converter, ...]]:
    """What the compiler applies to a column of this field (``vendor``: one per backend)."""
    field = model._meta.get_field(name)
    column = field.get_col(model._meta.db_table)
    return column, tuple(
        connection.ops.get_db_converters(column) + field.get_db_converters(connection)
    )
