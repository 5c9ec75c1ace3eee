"""The report pages as an auditor or a commander reads them: the objectives report and the
lessons-learned log with its CSV export."""

import csv
import datetime as dt
import io
import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from incidents.models import ActionItem, IncidentStatus, Scenario
from migrations_ops.roles import AUDITOR, INCIDENT_COMMANDER
from tests.factories import IncidentFactory, UserFactory
from tests.incidents.test_admin import member

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("roles")]

START = dt.datetime(2026, 3, 10, 12, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
OBJECTIVES_URL = "/admin/incidents/reports/objectives/"
LESSONS_URL = "/admin/incidents/reports/lessons/"


def incident(**kwargs):
    defaults = {
        "opened_at": START,
        "impact_started_at": START,
        "detected_at": START + MINUTE,
        "detect_objective": MINUTE,
        "mitigate_objective": 5 * MINUTE,
        "recover_objective": 30 * MINUTE,
    }
    return IncidentFactory(**{**defaults, **kwargs})


def closed(**kwargs):
    defaults = {
        "status": IncidentStatus.CLOSED,
        "mitigated_at": START + 4 * MINUTE,
        "recovered_at": START + 22 * MINUTE + 30 * dt.timedelta(seconds=1),
        "closed_at": START + dt.timedelta(days=1),
    }
    return incident(**{**defaults, **kwargs})


def action_item(for_incident, title, **kwargs):
    defaults = {"kind": "corrective", "owner_name": "dba", "created_by": "tests"}
    return ActionItem.objects.create(incident=for_incident, title=title, **{**defaults, **kwargs})


def phase_cells(body, scenario, phase):
    """The objectives report's row for ``phase`` of ``scenario``: cell class → text."""
    section = body.split(f'id="scenario-{scenario}"', 1)[1].split("</table>", 1)[0]
    row = section.split(f'data-phase="{phase}"', 1)[1].split("</tr>", 1)[0]
    cells = re.findall(r'<td class="number (\w+)">(.*?)</td>', row, re.S)
    return {name: re.sub(r"<[^>]+>", " ", text).split() for name, text in cells}


def csv_rows(response):
    return list(csv.reader(io.StringIO(response.content.decode())))


def test_auditor_reads_the_objectives_report_with_figures_and_charts(client):
    member(client, AUDITOR)
    for minutes in (2, 4, 5, 6, 10):
        incident(mitigated_at=START + minutes * MINUTE)
    incident()  # not mitigated yet
    incident(scenario=Scenario.PRODUCTION_EMERGENCY, detect_objective=None)

    response = client.get(OBJECTIVES_URL)

    assert response.status_code == 200
    body = response.content.decode()
    assert "Migration failure: 6 incidents" in body
    assert "Production emergency: 1 incident<" in body
    assert phase_cells(body, "migration_failure", "mitigate") == {
        "objective": ["5"],
        "measured": ["5"],
        "median": ["5"],
        "p90": ["8.4"],
        "met": ["3", "of", "5", "(60%)"],
        "pending": ["1", "1", "already", "past", "the", "objective"],
    }
    # Every detection took exactly the objective: met.
    assert phase_cells(body, "migration_failure", "detect")["met"] == ["6", "of", "6", "(100%)"]
    assert phase_cells(body, "production_emergency", "detect")["met"] == ["-"]
    # One chart per phase with a finished incident, each with its own title.
    assert body.count('class="strip-chart"') == 3  # both detects, one mitigate
    assert 'id="chart-migration_failure-mitigate-title"' in body
    assert "objective 5</text>" in body
    assert "nothing finished yet" in body  # neither scenario has a recovered incident


def test_objectives_report_filters_on_scenario_and_opening_days(client):
    member(client, INCIDENT_COMMANDER)
    incident(opened_at=dt.datetime(2026, 3, 1, tzinfo=dt.UTC), title="first of march")
    incident(opened_at=dt.datetime(2026, 3, 31, 23, 59, tzinfo=dt.UTC))
    incident(opened_at=dt.datetime(2026, 4, 1, tzinfo=dt.UTC))
    incident(opened_at=dt.datetime(2026, 3, 15, tzinfo=dt.UTC), scenario=Scenario.OTHER)

    march = client.get(OBJECTIVES_URL, {"since": "2026-03-01", "until": "2026-03-31"})
    body = march.content.decode()
    assert "Migration failure: 2 incidents" in body  # the last day counts whole
    assert "Other: 1 incident<" in body
    other = client.get(OBJECTIVES_URL, {"scenario": "other"}).content.decode()
    assert "Other: 1 incident<" in other
    assert 'id="scenario-migration_failure"' not in other
    empty = client.get(OBJECTIVES_URL, {"since": "2027-01-01"}).content.decode()
    assert "No incidents were opened in this range." in empty


@pytest.mark.parametrize("url", [OBJECTIVES_URL, LESSONS_URL])
@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"since": "2026-13-45"}, "Enter a date as YYYY-MM-DD, e.g. 2026-03-01."),
        ({"until": "last tuesday"}, "Enter a date as YYYY-MM-DD, e.g. 2026-03-01."),
        (
            {"since": "2026-04-02", "until": "2026-04-01"},
            "The range starts (2026-04-02) after it ends (2026-04-01).",
        ),
        ({"scenario": "meteor"}, "Select a valid choice. meteor is not one of the available"),
    ],
)
def test_bad_filters_show_a_one_line_error_and_no_report(client, url, query, error):
    member(client, AUDITOR)
    closed(title="should not be listed")
    response = client.get(url, {**query, "format": "csv"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    body = response.content.decode()
    assert error in body
    assert "Fix the filters above to see the report." in body
    assert "should not be listed" not in body


@pytest.mark.parametrize("url", [OBJECTIVES_URL, LESSONS_URL])
def test_only_those_who_may_view_incidents_see_the_reports(client, url):
    assert client.get(url)["Location"].startswith("/admin/login/")
    client.force_login(UserFactory(permissions=["migrations_ops.view_target"]))
    assert client.get(url).status_code == 403
    assert client.get(url, {"format": "csv"}).status_code == 403
    client.force_login(UserFactory(permissions=["incidents.view_incident"]))
    assert client.get(url).status_code == 200


def test_incident_list_and_admin_index_link_to_the_reports(client):
    member(client, AUDITOR)
    for page in (reverse("admin:incidents_incident_changelist"), reverse("admin:index")):
        body = client.get(page).content.decode()
        assert f'href="{OBJECTIVES_URL}"' in body
        assert f'href="{LESSONS_URL}"' in body
    client.force_login(UserFactory(permissions=["migrations_ops.view_target"]))
    assert OBJECTIVES_URL not in client.get(reverse("admin:index")).content.decode()


def test_lessons_log_shows_closed_incidents_with_action_items(client):
    member(client, AUDITOR)
    lesson = closed(
        title="billing index stuck",
        root_cause="index built without CONCURRENTLY",
        resolution="rolled back 042",
        prevention="lint migrations for CONCURRENTLY",
    )
    action_item(lesson, "add the lint", owner_name="dba", link="https://tracker.example/42")
    action_item(lesson, "bad link", kind="detective", link="javascript:alert(1)")
    incident(title="still open")

    body = client.get(LESSONS_URL).content.decode()

    assert "1 closed incident<" in body
    assert "billing index stuck" in body
    assert "still open" not in body
    assert "22.5<br>" in body  # minutes to recovery, from the impact's start
    assert "objective 30: met" in body
    assert '<a href="https://tracker.example/42">Corrective: add the lint (dba, Open)</a>' in body
    assert "<li>Detective: bad link (dba, Open)</li>" in body
    assert "javascript:" not in body
    assert 'href="?format=csv"' in body


def test_lessons_csv_has_a_header_one_row_per_incident_and_minutes(client):
    member(client, AUDITOR)
    lesson = closed(
        title="billing index stuck",
        root_cause="no CONCURRENTLY",
        resolution="rolled back",
        prevention="lint",
        process_improvements="review checklist",
    )
    action_item(lesson, "add the lint", owner_name="dba")
    action_item(lesson, "alert on lock age", kind="detective", owner_name="sre", status="done")
    closed(title="second", closed_at=START + dt.timedelta(days=3), recovered_at=START + 40 * MINUTE)

    response = client.get(LESSONS_URL, {"format": "csv"})

    assert response["Content-Type"] == "text/csv; charset=utf-8"
    today = timezone.now().astimezone(dt.UTC)
    assert response["Content-Disposition"] == (
        f'attachment; filename="lessons-learned-{today:%Y%m%d}.csv"'
    )
    header, *rows = csv_rows(response)
    assert header[:9] == [
        "incident",
        "title",
        "scenario",
        "severity",
        "started (UTC)",
        "closed (UTC)",
        "time to recovery (min)",
        "recovery objective (min)",
        "recovery objective result",
    ]
    assert [row[1] for row in rows] == ["second", "billing index stuck"]  # last closed first
    assert rows[0][6:9] == ["40", "30", "breached"]
    assert dict(zip(header, rows[1], strict=True)) == {
        "incident": str(lesson.pk),
        "title": "billing index stuck",
        "scenario": "Migration failure",
        "severity": "SEV2",
        "started (UTC)": "2026-03-10 12:00:00",
        "closed (UTC)": "2026-03-11 12:00:00",
        "time to recovery (min)": "22.5",
        "recovery objective (min)": "30",
        "recovery objective result": "met",
        "root cause": "no CONCURRENTLY",
        "actions taken": "rolled back",
        "prevention measures": "lint",
        "process improvements": "review checklist",
        "action items": "Corrective: add the lint (dba, Open); "
        "Detective: alert on lock age (sre, Done)",
    }


def test_lessons_csv_uses_the_page_filters(client):
    member(client, AUDITOR)
    closed(title="sev1 lint", severity="sev1", root_cause="no lint")
    closed(title="sev1 other", severity="sev1", root_cause="disk full")
    closed(title="sev3 lint", severity="sev3", root_cause="no lint")
    closed(title="conflict lint", severity="sev1", scenario=Scenario.CONCURRENT_CONFLICT)
    closed(title="late lint", severity="sev1", closed_at=START + dt.timedelta(days=9))
    query = {
        "scenario": "migration_failure",
        "severity": "sev1",
        "q": "lint",
        "since": "2026-03-11",
        "until": "2026-03-11",
    }

    page = client.get(LESSONS_URL, query).content.decode()
    rows = csv_rows(client.get(LESSONS_URL, {**query, "format": "csv"}))

    assert [row[1] for row in rows[1:]] == ["sev1 lint"]
    assert "sev1 lint" in page
    assert "sev1 other" not in page
    assert "late lint" not in page
    # The page's CSV link carries its filters.
    link = re.search(r'href="\?([^"]+)" class="button" id="lessons-csv"', page).group(1)
    assert "severity=sev1" in link
    assert "q=lint" in link
    assert "format=csv" in link


def test_lessons_csv_defuses_cells_a_spreadsheet_would_run_as_formulas(client):
    member(client, AUDITOR)
    lesson = closed(
        title='=HYPERLINK("http://evil.example","click")',
        root_cause="+1 from the lock",
        resolution="-rolled back",
        prevention="@SUM(A1)",
        process_improvements="\tindented",
    )
    action_item(lesson, "fine", owner_name="dba")
    row = dict(zip(*csv_rows(client.get(LESSONS_URL, {"format": "csv"})), strict=True))
    assert row["title"] == '\'=HYPERLINK("http://evil.example","click")'
    assert row["root cause"] == "'+1 from the lock"
    assert row["actions taken"] == "'-rolled back"
    assert row["prevention measures"] == "'@SUM(A1)"
    assert row["process improvements"] == "'\tindented"
    assert row["action items"] == "Corrective: fine (dba, Open)"
    assert row["incident"] == str(lesson.pk)


def test_lessons_log_queries_do_not_grow_with_incidents(client):
    member(client, AUDITOR)

    def add_closed(count):
        for _ in range(count):
            lesson = closed()
            action_item(lesson, "one")
            action_item(lesson, "two", kind="preventive")

    def queries(params):
        with CaptureQueriesContext(connection) as captured:
            response = client.get(LESSONS_URL, params)
        assert response.status_code == 200
        return len(captured)

    add_closed(1)
    page, export = queries({}), queries({"format": "csv"})
    add_closed(5)
    assert queries({}) == page
    assert queries({"format": "csv"}) == export
