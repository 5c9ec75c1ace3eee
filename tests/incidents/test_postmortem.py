"""The Markdown post-mortem: the same incident gives the same bytes, the real timeline is in
it, and nothing typed into a cell breaks its table."""

import datetime as dt
from html.parser import HTMLParser

import pytest
from django.urls import reverse
from markdown_it import MarkdownIt

from incidents import selectors, services
from incidents.models import IncidentStatus, Scenario
from incidents.postmortem import cell, inert, render_postmortem
from tests.factories import TargetFactory, UserFactory

pytestmark = pytest.mark.django_db

START = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
LATER = START + dt.timedelta(days=2)


def markdown(incident, now=LATER):
    return render_postmortem(selectors.postmortem_data(incident, now))


@pytest.fixture
def closed(commander):
    incident = services.open_incident(
        actor=commander,
        title="orders lock stuck",
        scenario=Scenario.CONCURRENT_CONFLICT,
        severity="sev2",
        targets=[TargetFactory(name="orders"), TargetFactory(name="billing")],
        culprit_migration="042_add_index.sql",
        impact_started_at=START,
    )
    for name, minutes in [("detected", 1), ("mitigated", 4), ("recovered", 20)]:
        services.set_timestamp(
            actor=commander,
            incident=incident,
            name=name,
            when=START + dt.timedelta(minutes=minutes),
        )
    services.add_note(actor=commander, incident=incident, text="holder | deploy-42\nthen gone")
    services.change_status(actor=commander, incident=incident, status=IncidentStatus.RESOLVED)
    services.change_status(actor=commander, incident=incident, status=IncidentStatus.POST_MORTEM)
    for item in incident.checklist.all():
        services.tick_checklist_item(actor=commander, item=item, passed=True, evidence="seen")
    incident.root_cause = "a deploy crashed holding the lock"
    incident.went_well = "the lock's holder was on the page"
    services.update_incident(
        actor=commander, incident=incident, changed=["root_cause", "went_well"]
    )
    services.add_action_item(
        actor=commander,
        incident=incident,
        title="release the lock on crash | in the deploy tool",
        kind="corrective",
        owner=commander.user,
        due_date=dt.date(2026, 4, 1),
        link="https://tracker.example.com/OPS-7",
    )
    incident = services.change_status(
        actor=commander, incident=incident, status=IncidentStatus.CLOSED
    )
    services.add_addendum(actor=commander, incident=incident, text="it happened on staging too")
    return incident


def test_the_same_incident_gives_the_same_bytes(closed):
    first = markdown(closed)
    closed.refresh_from_db()
    assert markdown(closed, now=LATER + dt.timedelta(days=30)).encode() == first.encode()


def test_it_holds_the_real_timeline_in_utc(closed):
    text = markdown(closed)
    for entry in closed.timeline.order_by("occurred_at", "id"):
        when = f"{entry.occurred_at.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC"
        assert f"| {when} | {entry.actor_name} | {cell(entry.text)} |" in text
    assert "| commander | holder \\| deploy-42<br>then gone |" in text


def test_it_has_the_metadata_the_sections_and_the_objectives(closed):
    text = markdown(closed)
    assert text.startswith(f"# Post-mortem: incident #{closed.pk} — orders lock stuck\n")
    for line in [
        "- **Scenario:** Concurrent migration conflict",
        "- **Severity:** SEV2",
        "- **Status:** Closed",
        "- **Commander:** commander",
        "- **Affected targets:** billing, orders",
        "- **Culprit migration:** 042_add_index.sql",
        "- **Escalation:** Level 1: on-call engineer (check runbook)",
        "| Time to detect | 1m00s | 2m00s | met |",
        "| Time to mitigate | 4m00s | 5m00s | met |",
        "| Time to recover | 20m00s | 15m00s | breached |",
        "| Impact started | 2026-03-01 12:00:00 UTC | commander |",
        "a deploy crashed holding the lock",
        "the lock's holder was on the page",
        "| No stuck locks | Passed | seen | commander |",
        "it happened on staging too",
    ]:
        assert line in text, line
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Summary",
        "## Impact",
        "## Timeline (UTC)",
        "## Recovery time against objectives",
        "## Trigger",
        "## Root cause and contributing factors",
        "## Detection",
        "## Resolution",
        "## Lessons learned",
        "## Action items",
        "## Prevention measures",
        "## Process improvements",
        "## Validation checklist",
        "## Addenda",
    ]
    item = closed.action_items.get()
    assert (
        f"| {item.pk} | release the lock on crash \\| in the deploy tool | Corrective | "
        "commander | 2026-04-01 | Open | https://tracker.example.com/OPS-7 |"
    ) in text
    assert "## Summary\n\n_Not written._\n" in text


def test_no_action_items_shows_the_reason(commander):
    incident = services.open_incident(
        actor=commander, title="t", scenario=Scenario.OTHER, severity="sev4"
    )
    incident.no_action_items_reason = "the tool was retired the same day"
    services.update_incident(actor=commander, incident=incident, changed=["no_action_items_reason"])
    text = markdown(incident)
    assert "## Action items\n\nNone. Why: the tool was retired the same day\n" in text
    assert "## Addenda" not in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a | b", "a \\| b"),
        ("one\ntwo\r\nthree", "one<br>two<br>three"),
        ("back\\slash", "back\\\\slash"),
        ("", "-"),
        (None, "-"),
    ],
)
def test_cells_escape_what_would_break_a_table(value, expected):
    assert cell(value) == expected


# --- what people typed renders no HTML and no link a viewer would run -----------------------------
HOSTILE = {
    "summary": "<script>alert(document.cookie)</script> and a [fix](https://tracker.example.com/1)",
    "impact": '[click](javascript:alert(1)) and [too]( JavaScript:alert(2) "t")',
    "root_cause": "![pixel](data:image/png;base64,AAAA) and <a href='javascript:x'>a</a>",
    "went_well": "[ref]\n\n[ref]: javascript:alert(3)\n\n<!-- hidden --> <?php x ?>",
    "went_wrong": "<https://ok.example.com> <javascript:alert(4)> mail [me](mailto:a@b.c)",
    "prevention": "[x](<javascript:alert(5)>) [y](vbscript:z) [z](/relative)",
}
SAFE_SCHEMES = ("http://", "https://", "mailto:")


class Rendered(HTMLParser):
    """The tags and the link destinations in a rendered page."""

    def __init__(self):
        super().__init__()
        self.tags, self.urls = set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.urls += [value or "" for name, value in attrs if name in ("href", "src")]
        assert not [name for name, _ in attrs if name.startswith("on")], (tag, attrs)


def as_html(markdown_text: str) -> Rendered:
    """Rendered as a permissive viewer would: CommonMark with tables, raw HTML allowed, and no
    check of link destinations (markdown-it-py's own check is turned off)."""
    renderer = MarkdownIt("commonmark").enable("table")
    renderer.validateLink = lambda url: True
    page = Rendered()
    page.feed(renderer.render(markdown_text))
    return page


def test_what_people_typed_renders_no_html_and_only_web_and_mail_links(commander, client):
    incident = services.open_incident(
        actor=commander,
        title="lock <img src=x onerror=alert(1)>",
        scenario=Scenario.OTHER,
        severity="sev3",
        culprit_migration="<svg onload=alert(7)>.sql",
    )
    for name, text in HOSTILE.items():
        setattr(incident, name, text)
    services.update_incident(actor=commander, incident=incident, changed=list(HOSTILE))
    services.add_note(
        actor=commander, incident=incident, text="<iframe src=//evil> [n](javascript:x)"
    )
    services.add_action_item(
        actor=commander,
        incident=incident,
        title="<b>x</b> [do](javascript:alert(8))",
        kind="corrective",
        owner=commander.user,
        link="https://tracker.example.com/OPS-7",
    )
    client.force_login(UserFactory(username="root", is_superuser=True))

    response = client.get(reverse("admin:incidents_incident_postmortem", args=[incident.pk]))

    assert response.status_code == 200
    page = as_html(response.content.decode())
    assert page.tags <= {
        "h1", "h2", "h3", "p", "ul", "li", "strong", "em", "a", "br", "code",
        "table", "thead", "tbody", "tr", "th", "td",
    }  # fmt: skip
    assert page.urls and all(url.lower().startswith(SAFE_SCHEMES) for url in page.urls)
    # What was safe still works, and what was refused still reads as typed.
    assert "https://tracker.example.com/1" in page.urls and "mailto:a@b.c" in page.urls
    text = response.content.decode()
    assert "&lt;script>alert(document.cookie)&lt;/script>" in text
    assert "[click&#93;(javascript:alert(1))" in text


@pytest.mark.parametrize(
    ("typed", "written"),
    [
        ("a < b, x<5, <3", "a < b, x<5, <3"),
        ("<b>bold</b>", "&lt;b>bold&lt;/b>"),
        ("[ok](https://a.example)", "[ok](https://a.example)"),
        ("[no](javascript:x)", "[no&#93;(javascript:x)"),
        ("[ref]: data:text/html,x", "[ref&#93;: data:text/html,x"),
    ],
)
def test_inert_keeps_markdown_and_text_and_drops_html_and_unsafe_links(typed, written):
    assert inert(typed) == written
