"""The admin site against hostile input: every admin changelist and object page, as a
superuser, with NUL characters, years no calendar holds, non-numeric ids, unknown fields and
actions for ids no row can have. None may answer 500."""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest
from django.contrib import admin
from django.db import models, transaction
from django.urls import reverse

from tests.opsconsole.console import admin_urls, build_console, logged_in

pytestmark = pytest.mark.django_db


def hostile_queries(model_admin) -> list[dict[str, str]]:
    model = model_admin.model
    queries = [
        {"q": "\x00"},
        {"q": "a\x00b"},
        {"q": "%ED%A0%80"},  # a lone surrogate, as UTF-8 bytes
        {"q": "x" * 5000},
        {"o": "99"},
        {"o": "abc"},
        {"p": "abc"},
        {"p": "99999999999999999999"},
        {"no_such_field": "1"},
        {"id__in": "abc"},
        {"pk": "\x00"},
        {"id": "abc"},
        {"id__gt": "99999999999999999999"},
        {"_to_field": "password"},
    ]
    for spec in model_admin.list_filter:
        name = spec if isinstance(spec, str) else None
        if name is None and isinstance(spec, tuple):
            name = spec[0]
        if name is None:
            parameter = getattr(spec, "parameter_name", None)
            if parameter:
                queries += [{parameter: "\x00"}, {parameter: "99999999999999999999"}]
            continue
        queries += [
            {name: "\x00"},
            {f"{name}__exact": "\x00"},
            {f"{name}__exact": "abc"},
            {f"{name}__id__exact": "abc"},
            {f"{name}__isnull": "maybe"},
            {f"{name}__gte": "99999999-01-01"},
            {f"{name}__lt": "\x00"},
        ]
    for field in model._meta.get_fields():
        if isinstance(field, models.DateField | models.DateTimeField):
            queries += [
                {f"{field.name}__year": "99999999"},
                {f"{field.name}__year": "0"},
                {f"{field.name}__year": "-5"},
                {f"{field.name}__month": "99"},
                {f"{field.name}__day": "\x00"},
                {f"{field.name}__gte": "99999-12-31"},
            ]
    hierarchy = model_admin.date_hierarchy
    if hierarchy:
        queries += [
            {f"{hierarchy}__year": "99999999"},
            {f"{hierarchy}__year": "9999", f"{hierarchy}__month": "12", f"{hierarchy}__day": "31"},
            {f"{hierarchy}__year": "1", f"{hierarchy}__month": "1", f"{hierarchy}__day": "1"},
            {f"{hierarchy}__year": "2026", f"{hierarchy}__month": "13"},
            {f"{hierarchy}__year": "2026", f"{hierarchy}__month": "2", f"{hierarchy}__day": "30"},
            {f"{hierarchy}__year": "abc"},
        ]
    return queries


def query_string(query: dict[str, str]) -> str:
    """Percent-encoded, except values given already encoded (the lone surrogate's bytes)."""
    return "&".join(
        f"{quote(name)}={value if value.startswith('%') else quote(value)}"
        for name, value in query.items()
    )


def status_of(client, url: str, post: dict | None = None) -> int:
    """In a savepoint of its own: a database error in one request must not poison the next
    (each real request has its own connection state)."""
    savepoint = transaction.savepoint()
    try:
        return (client.post(url, post) if post is not None else client.get(url)).status_code
    finally:
        transaction.savepoint_rollback(savepoint)


def action_names(model_admin) -> list[str]:
    names = [name if isinstance(name, str) else name.__name__ for name in model_admin.actions or []]
    return [*names, "delete_selected"]


HOSTILE_IDS = ["%00", "abc", "99999999999999999999", "-1", "1%00", "%ED%A0%80"]


# Any admin page (reports, exports, custom views): hostile query strings, and its numeric ids
# replaced by one no bigint holds.
PAGE_QUERIES = [
    "q=%00",
    "q=%ED%A0%80",
    "target=%00",
    "created_at__year=99999999",
    "occurred_at__year=0",
    "p=99999999999999999999",
    "since=%00",
    "until=99999-01-01",
]


def test_no_admin_page_answers_500_to_hostile_input(roles, pg_target, sqlite_target, tmp_path):
    """Every changelist with hostile filters, ids and actions posted for ids no row can have;
    then every admin URL pattern (reports, exports, custom views) with hostile query strings
    and an id no bigint holds."""
    console = build_console(pg_target, sqlite_target, tmp_path)
    client = logged_in(console.users["superuser"])
    client.raise_request_exception = False
    failures = []
    for model, model_admin in admin.site._registry.items():
        info = (model._meta.app_label, model._meta.model_name)
        changelist = reverse("admin:{}_{}_changelist".format(*info))
        for query in hostile_queries(model_admin):
            url = f"{changelist}?{query_string(query)}"
            status = status_of(client, url)
            if status >= 500:
                failures.append(f"{status} {url}")
        for action in action_names(model_admin):
            for selected in ("abc", "\x00", "1.5"):
                post = {"action": action, "_selected_action": selected, "index": "0"}
                status = status_of(client, changelist, post)
                if status >= 500:
                    failures.append(f"{status} POST {changelist} {post!r}")
        for object_id in HOSTILE_IDS:
            for suffix in ("change/", "history/", "delete/"):
                url = f"{changelist}{object_id}/{suffix}"
                status = status_of(client, url)
                if status >= 500:
                    failures.append(f"{status} {url}")
    for _name, url in admin_urls(console):
        urls = [f"{url}?{query}" for query in PAGE_QUERIES]
        if re.search(r"/\d+/", url):
            urls.append(re.sub(r"/\d+/", "/99999999999999999999/", url, count=1))
        for hostile in urls:
            status = status_of(client, hostile)
            if status >= 500:
                failures.append(f"{status} {hostile}")
    assert failures == []


@pytest.mark.parametrize(
    ("query", "kept"),
    [
        ("attempt_time__year=99999999", ""),
        ("attempt_time__year=--5", ""),
        (
            "attempt_time__year=9999&attempt_time__month=12&attempt_time__day=31",
            "attempt_time__month=12&attempt_time__day=31",
        ),
        ("attempt_time__year=2026&attempt_time__month=13", "attempt_time__year=2026"),
    ],
)
def test_a_date_no_calendar_holds_is_dropped_with_a_message(roles, query, kept):
    from django.contrib.messages import get_messages

    from tests.factories import UserFactory

    client = logged_in(UserFactory(username="root", is_superuser=True))
    changelist = reverse("admin:axes_accessattempt_changelist")

    response = client.get(f"{changelist}?{query}")

    assert response.status_code == 302
    assert response["Location"] == (f"{changelist}?{kept}" if kept else changelist)
    [message] = get_messages(response.wsgi_request)
    assert "no such date on the calendar" in str(message)
    assert client.get(response["Location"]).status_code == 200


def test_an_action_posted_for_an_id_no_row_can_have_does_nothing_and_says_so(roles):
    from django.contrib.messages import get_messages

    from migrations_ops.models import ApiToken
    from tests.factories import UserFactory

    client = logged_in(UserFactory(username="root", is_superuser=True))
    changelist = reverse("admin:migrations_ops_apitoken_changelist")

    response = client.post(
        changelist, {"action": "revoke", "_selected_action": "abc", "index": "0"}
    )

    assert response.status_code == 302 and response["Location"] == changelist
    [message] = get_messages(response.wsgi_request)
    assert str(message) == "Nothing done: 'abc' is not the id of any row here."
    assert not ApiToken.objects.exists()
