"""The report's strip chart: well-formed SVG whose marks sit where their minutes say, with a
text for every one of them."""

import datetime as dt
import xml.etree.ElementTree as ET

import pytest

from incidents.charts import (
    PLOT_LEFT,
    PLOT_RIGHT,
    Point,
    as_minutes,
    axis_step,
    format_minutes,
    strip_chart,
)

SVG = "{http://www.w3.org/2000/svg}"


def parse(markup):
    return ET.fromstring(str(markup))  # noqa: S314 - our own markup


def texts(root):
    return [element.text for element in root.iter(f"{SVG}text")]


def chart(**kwargs):
    defaults = {
        "chart_id": "c1",
        "title": "Migration failure: time to mitigate in minutes",
        "points": [
            Point(2, "#1 quick: 2 min, met", True),
            Point(5, "#2 on the dot: 5 min, met", True),
            Point(9, "#3 slow: 9 min, breached", False),
        ],
        "median": 5,
        "p90": 8.2,
        "objectives": [5],
    }
    return parse(strip_chart(**{**defaults, **kwargs}))


def x_where(root, tag, **attributes):
    for element in root.iter(f"{SVG}{tag}"):
        if all(element.get(name) == value for name, value in attributes.items()):
            return float(element.get("x1"))
    raise AssertionError(f"no {tag} with {attributes}")


@pytest.mark.parametrize(
    ("largest", "step"), [(9.1, 2), (10, 2), (30, 10), (45, 10), (0.9, 0.2), (1, 0.2), (60, 20)]
)
def test_axis_steps_are_round_and_give_at_most_five_intervals(largest, step):
    assert axis_step(largest) == pytest.approx(step)
    assert largest / axis_step(largest) <= 5


def test_minutes_are_shown_with_one_decimal_at_most():
    assert as_minutes(dt.timedelta(minutes=4, seconds=30)) == 4.5
    assert as_minutes(None) is None
    assert format_minutes(4.5) == "4.5"
    assert format_minutes(30.0) == "30"
    assert format_minutes(1 / 3) == "0.3"
    assert format_minutes(None) == "-"


def test_chart_has_a_title_a_description_and_a_labelled_axis_in_minutes():
    root = chart()
    assert root.get("role") == "img"
    assert root.get("aria-labelledby") == "c1-title c1-desc"
    assert root.find(f"{SVG}title").text == "Migration failure: time to mitigate in minutes"
    assert root.find(f"{SVG}desc").text == (
        "3 incident(s); median 5 minutes; 90th percentile 8.2 minutes; objective 5 minutes; "
        "2 of 3 met it."
    )
    labels = texts(root)
    assert "minutes" in labels
    # Ticks every 2 minutes up to the first round value at or past the slowest incident.
    assert [label for label in labels if label.isdigit()] == ["0", "2", "4", "6", "8", "10"]
    assert "objective 5" in labels
    assert "median 5 (solid), p90 8.2 (dashed)" in labels


def at(minutes):
    """Where ``minutes`` falls on an axis running 0..10, to the 0.1 the SVG is written with."""
    return pytest.approx(PLOT_LEFT + (PLOT_RIGHT - PLOT_LEFT) * minutes / 10, abs=0.05)


def test_marks_sit_at_their_minutes_against_the_objective_line():
    root = chart()
    assert x_where(root, "line", **{"class": "objective"}) == at(5)
    assert x_where(root, "line", **{"class": "median"}) == at(5)
    assert x_where(root, "line", **{"class": "p90"}) == at(8.2)
    met = list(root.iter(f"{SVG}circle"))
    assert [float(c.get("cx")) for c in met] == [at(2), at(5)]
    assert [c.find(f"{SVG}title").text for c in met] == [
        "#1 quick: 2 min, met",
        "#2 on the dot: 5 min, met",
    ]
    # A breached incident is a cross, not a dot: it differs without colour too.
    (breached,) = root.iter(f"{SVG}path")
    assert breached.find(f"{SVG}title").text == "#3 slow: 9 min, breached"
    assert float(breached.get("d")[1:].split(",")[0]) + 4 == at(9)


def test_objective_beyond_every_incident_still_fits_on_the_axis():
    root = chart(points=[Point(1, "#1", True)], median=1, p90=1, objectives=[30])
    assert x_where(root, "line", **{"class": "objective"}) <= PLOT_RIGHT
    assert "30" in texts(root)


def test_incident_without_objective_is_a_grey_square_and_not_counted_as_met():
    root = chart(points=[Point(3, "#4 no objective", None)], median=3, p90=3, objectives=[])
    (square,) = root.iter(f"{SVG}rect")
    assert square.find(f"{SVG}title").text == "#4 no objective"
    assert root.find(f"{SVG}desc").text == (
        "1 incident(s); median 3 minutes; 90th percentile 3 minutes."
    )
    assert not [line for line in root.iter(f"{SVG}line") if line.get("class") == "objective"]


def test_text_from_incidents_is_escaped():
    root = chart(
        title='<script>alert("x")</script>',
        points=[Point(1, '#5 </title><script>alert("x")</script>', False)],
    )
    assert root.find(f"{SVG}title").text == '<script>alert("x")</script>'
    assert not list(root.iter(f"{SVG}script"))


def test_no_points_is_still_a_chart_that_says_so():
    root = chart(points=[], median=None, p90=None, objectives=[])
    assert root.find(f"{SVG}desc").text == "No finished phase to show."
    assert "median - (solid), p90 - (dashed)" in texts(root)
