"""Admin changelists over tables with millions of rows (operations, audit events).

What the stock changelist does that grows with the table, and what replaces it here:

- ``COUNT(*)`` of the whole table on every page, and of every filtered result:
  ``LargeTablePaginator`` knows a small result's count from the page it reads anyway, counts
  exactly only what the planner expects to be small (``SELECT count(*) FROM (SELECT ... LIMIT
  n)``), and otherwise takes PostgreSQL's planner estimate (for the whole table:
  ``pg_class.reltuples`` scaled to its current size); the pages then say "about".
- ``OFFSET`` over wide joined rows on deep pages: the ids first, then the page's rows.
- ``date_hierarchy``: a ``SELECT DISTINCT date_trunc(...)`` over every row for its links;
  ``PeriodFilter`` offers recent periods and the years (months of the chosen year) from one
  ``MIN``/``MAX`` that an index answers.
- ``AllValuesFieldListFilter``: a ``SELECT DISTINCT`` over every row; ``distinct_values`` walks
  an index instead (a "loose index scan": one index descent per distinct value).
- ``icontains`` search: a scan of every row. Searches here match the distinct values of a few
  name columns (found as above) and then filter with ``IN``, which an index answers.
"""

from __future__ import annotations

import datetime as dt
import json

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import PAGE_VAR, ChangeList
from django.core.paginator import EmptyPage, Paginator
from django.db import connections
from django.db.models import Max, Min, Q, QuerySet
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.text import smart_split, unescape_string_literal

# A changelist's count is exact when its rows fit on the page shown, or when the planner
# expects at most this many (then counted, up to this many); otherwise an estimate.
EXACT_COUNT_LIMIT = 2_000
# From this offset on, a page is read as ids first (an index-only scan), then those rows.
DEFERRED_JOIN_OFFSET = 1_000
# A column with more distinct values than this is searched by exact value instead.
DISTINCT_VALUES_LIMIT = 1_000
# No table here holds 10^12 rows; a page past that is no page, and its OFFSET could overflow
# the database's bigint.
MAX_ROW_OFFSET = 10**12


# --- counting ------------------------------------------------------------------------------------
def planner_estimate(queryset: QuerySet) -> int:
    """How many rows PostgreSQL's planner expects ``queryset`` to return (one EXPLAIN, nothing
    is read). For a whole table this is ``reltuples`` scaled to the table's current pages."""
    queryset = queryset.order_by().select_related(None)
    sql, params = queryset.query.get_compiler(using=queryset.db).as_sql()
    with connections[queryset.db].cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


class LargeTablePaginator(Paginator):
    """A paginator that never counts a large result on PostgreSQL.

    ``count`` first reads the page asked for (``requested_page``, set from the request by
    ``LargeTableAdminMixin``) and one row more, which is the query the page needs anyway:

    - nothing after it: the count is exact (``bottom + rows``), no count query at all;
    - more rows, and the planner expects at most ``EXACT_COUNT_LIMIT``: counted exactly with
      ``SELECT count(*) FROM (SELECT ... LIMIT EXACT_COUNT_LIMIT + 1)``;
    - else the planner's estimate (for the whole table, ``pg_class.reltuples`` scaled to its
      size), never less than the rows already seen, so the next page always has a link;
      ``approximate`` is then True and the pages say "about".

    A page past an estimate that fell short still opens. Deep pages read the page's ids first
    (an index-only scan over the offset rows) and then only those rows. Elsewhere (SQLite, a
    list, orphans) it is Django's paginator."""

    approximate = False
    requested_page = 1
    _page_rows: tuple[int, list] | None = None

    def _fast(self) -> bool:
        queryset = self.object_list
        return (
            isinstance(queryset, QuerySet)
            and connections[queryset.db].vendor == "postgresql"
            and not queryset.query.is_sliced
            and not self.orphans
        )

    def _rows(self, bottom: int, top: int) -> list:
        queryset = self.object_list
        if bottom < DEFERRED_JOIN_OFFSET:
            return list(queryset[bottom:top])
        ids = list(queryset.values_list("pk", flat=True)[bottom:top])
        return list(queryset.filter(pk__in=ids)) if ids else []

    @cached_property
    def count(self) -> int:
        if not self._fast():
            return super().count
        number = max(self.requested_page, 1)
        bottom = (number - 1) * self.per_page
        rows = self._rows(bottom, bottom + self.per_page + 1)
        self._page_rows = (number, rows[: self.per_page])
        seen = bottom + len(rows)
        if len(rows) <= self.per_page and (rows or bottom == 0):
            return seen
        queryset = self.object_list
        estimate = planner_estimate(queryset)
        if estimate <= EXACT_COUNT_LIMIT:
            counted = queryset.order_by()[: EXACT_COUNT_LIMIT + 1].count()
            if counted <= EXACT_COUNT_LIMIT:
                return counted
            estimate = counted
        self.approximate = True
        return max(estimate, seen)

    def validate_number(self, number):
        try:
            number = super().validate_number(number)
        except EmptyPage:
            if self.approximate and 1 < int(number) <= self.last_possible_page:
                return int(number)
            raise
        return number

    @property
    def last_possible_page(self) -> int:
        return MAX_ROW_OFFSET // self.per_page

    def page(self, number):
        if not self._fast():
            return super().page(number)
        number = self.validate_number(number)
        if self._page_rows is not None and self._page_rows[0] == number:
            rows = self._page_rows[1]
        else:
            bottom = (number - 1) * self.per_page
            rows = self._rows(bottom, bottom + self.per_page)
        return self._get_page(rows, number, self)


class LargeTableChangeList(ChangeList):
    """Shows the rows ``LargeTablePaginator`` read to count a one-page result, instead of
    reading them again."""

    def get_results(self, request):
        super().get_results(request)
        read = getattr(self.paginator, "_page_rows", None)
        if not self.multi_page and read is not None and read[0] == 1:
            self.result_list = read[1]


# --- distinct values -----------------------------------------------------------------------------
LOOSE_INDEX_SCAN = """
WITH RECURSIVE found(value) AS (
    (SELECT {column} FROM {table} WHERE {column} IS NOT NULL ORDER BY {column} LIMIT 1)
    UNION ALL
    SELECT (SELECT {column} FROM {table} WHERE {column} > found.value ORDER BY {column} LIMIT 1)
    FROM found WHERE found.value IS NOT NULL
)
SELECT value FROM found WHERE value IS NOT NULL LIMIT %s
"""


def distinct_values(request, model, field_name: str) -> list | None:
    """The distinct values of ``field_name`` in ``model``'s table, sorted; None when there are
    more than ``DISTINCT_VALUES_LIMIT``. On PostgreSQL each value costs one descent of an index
    that starts with the column, so it needs such an index. Kept on ``request``: a changelist
    asks for the same column from a filter and from the search."""
    cache = request.__dict__.setdefault("_distinct_values", {})
    key = (model._meta.label, field_name)
    if key not in cache:
        manager = model._default_manager
        connection = connections[manager.db]
        if connection.vendor == "postgresql":
            sql = LOOSE_INDEX_SCAN.format(
                column=connection.ops.quote_name(model._meta.get_field(field_name).column),
                table=connection.ops.quote_name(model._meta.db_table),
            )
            with connection.cursor() as cursor:
                cursor.execute(sql, [DISTINCT_VALUES_LIMIT + 1])
                values = [row[0] for row in cursor.fetchall()]
        else:
            values = list(
                manager.order_by(field_name)
                .values_list(field_name, flat=True)
                .distinct()[: DISTINCT_VALUES_LIMIT + 1]
            )
        cache[key] = values if len(values) <= DISTINCT_VALUES_LIMIT else None
    return cache[key]


class DistinctValuesFilter(admin.SimpleListFilter):
    """A list filter offering every value of a column, found without a DISTINCT over the table
    (``distinct_values``). Subclass with ``title``, ``parameter_name`` and ``field_name``."""

    field_name: str

    def lookups(self, request, model_admin):
        values = distinct_values(request, model_admin.model, self.field_name) or []
        return [(value, value) for value in values if value != ""]

    def queryset(self, request, queryset):
        if self.value() is None:
            return queryset
        return queryset.filter(**{self.field_name: self.value()})


# --- periods -------------------------------------------------------------------------------------
RECENT = {"24h": ("Past 24 hours", 1), "7d": ("Past 7 days", 7), "30d": ("Past 30 days", 30)}


class PeriodFilter(admin.SimpleListFilter):
    """In place of ``date_hierarchy``: recent periods, every year with rows, and the months of
    the chosen year; ``2025`` or ``2025-03`` in the URL. Subclass with ``parameter_name`` and
    ``field_name``."""

    title = "date"
    field_name: str

    def lookups(self, request, model_admin):
        choices = [(key, label) for key, (label, _) in RECENT.items()]
        span = model_admin.get_queryset(request).aggregate(
            first=Min(self.field_name), last=Max(self.field_name)
        )
        if span["first"] is None:
            return choices
        first, last = (timezone.localtime(span[key]) for key in ("first", "last"))
        chosen_year = (self.value() or "")[:4]
        for year in range(last.year, first.year - 1, -1):
            choices.append((str(year), str(year)))
            if str(year) == chosen_year:
                months = range(
                    last.month if year == last.year else 12,
                    (first.month if year == first.year else 1) - 1,
                    -1,
                )
                choices += [
                    (f"{year}-{m:02}", f"\u2003{dt.date(year, m, 1):%B %Y}") for m in months
                ]
        return choices

    def bounds(self) -> tuple[dt.datetime, dt.datetime | None]:
        value = self.value()
        if value in RECENT:
            return timezone.now() - dt.timedelta(days=RECENT[value][1]), None
        try:
            year, _, month = value.partition("-")
            start = dt.datetime(int(year), int(month or 1), 1)
            if month:
                end = (start + dt.timedelta(days=32)).replace(day=1)
            else:
                end = start.replace(year=start.year + 1)
        except (ValueError, OverflowError):
            raise IncorrectLookupParameters(f"unknown period {value!r}") from None
        zone = timezone.get_current_timezone()
        return timezone.make_aware(start, zone), timezone.make_aware(end, zone)

    def queryset(self, request, queryset):
        if self.value() is None:
            return queryset
        start, end = self.bounds()
        queryset = queryset.filter(**{f"{self.field_name}__gte": start})
        return queryset.filter(**{f"{self.field_name}__lt": end}) if end else queryset


# --- search --------------------------------------------------------------------------------------
def search_terms(search_term: str) -> list[str]:
    """The words of a changelist search as Django's admin splits them (quotes group words)."""
    terms = []
    for bit in smart_split(search_term):
        if bit.startswith(('"', "'")) and bit[0] == bit[-1]:
            bit = unescape_string_literal(bit)
        if bit:
            terms.append(bit)
    return terms


def matching_values(request, model, field_name: str, term: str) -> Q:
    """Rows whose ``field_name`` contains ``term`` (any case), as ``field_name IN (...)`` over
    the column's distinct values; an exact match when the column has too many of them."""
    values = distinct_values(request, model, field_name)
    if values is None:
        return Q(**{field_name: term})
    folded = term.casefold()
    found = [value for value in values if folded in str(value).casefold()]
    return Q(**{f"{field_name}__in": found}) if found else Q(pk__in=[])


def period_filter(field_name: str, parameter_name: str) -> type[PeriodFilter]:
    return type(
        f"PeriodFilter_{field_name}",
        (PeriodFilter,),
        {"field_name": field_name, "parameter_name": parameter_name},
    )


def values_filter(field_name: str, parameter_name: str, title: str) -> type[DistinctValuesFilter]:
    return type(
        f"DistinctValuesFilter_{field_name}",
        (DistinctValuesFilter,),
        {"field_name": field_name, "parameter_name": parameter_name, "title": title},
    )


class LargeTableAdminMixin:
    """For a ``ModelAdmin`` of a large table: the paginator above, no full count, and a
    search every word of which must match (any case, any part) a distinct value of one of
    ``search_columns``, the ``field`` of a row of a small related table (``search_related``:
    ``(foreign key, field)`` pairs), or equal one of ``search_numbers`` (``123`` or ``#123``).
    Each such column needs an index starting with it."""

    paginator = LargeTablePaginator
    show_full_result_count = False
    search_columns: tuple[str, ...] = ()
    search_related: tuple[tuple[str, str], ...] = ()
    search_numbers: tuple[str, ...] = ()

    def get_changelist(self, request, **kwargs):
        return LargeTableChangeList

    def get_paginator(self, request, queryset, per_page, orphans=0, allow_empty_first_page=True):
        paginator = super().get_paginator(
            request, queryset, per_page, orphans, allow_empty_first_page
        )
        try:  # as the changelist reads it
            paginator.requested_page = int(request.GET.get(PAGE_VAR, 1))
        except ValueError:
            paginator.requested_page = 1
        if paginator.requested_page > paginator.last_possible_page:
            paginator.requested_page = 1  # the changelist then refuses the page itself
        return paginator

    def get_search_results(self, request, queryset, search_term):
        for term in search_terms(search_term):
            match = Q(pk__in=[])
            for column in self.search_columns:
                match |= matching_values(request, self.model, column, term)
            for foreign_key, field in self.search_related:
                related = self.model._meta.get_field(foreign_key).related_model
                rows = related._default_manager.filter(**{f"{field}__icontains": term})
                ids = list(rows.values_list("pk", flat=True)[: DISTINCT_VALUES_LIMIT + 1])
                if len(ids) > DISTINCT_VALUES_LIMIT:
                    match |= Q(**{f"{foreign_key}__in": rows.values("pk")})
                elif ids:
                    match |= Q(**{f"{foreign_key}__in": ids})
            number = term.removeprefix("#")
            if number.isascii() and number.isdigit():
                for field in self.search_numbers:
                    match |= Q(**{field: int(number)})
            queryset = queryset.filter(match)
        return queryset, False
