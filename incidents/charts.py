"""Server-rendered SVG for the report pages: no JavaScript to load, and readable without colour
or sight (a text label or a <title> on every mark). Pure functions of their arguments."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from django.utils.safestring import SafeString, mark_safe

WIDTH = 480
HEIGHT = 116
PLOT_LEFT = 12
PLOT_RIGHT = WIDTH - 24
LANE_TOP, LANE_BOTTOM = 20, 66
AXIS_Y = 72
MET_COLOUR, BREACHED_COLOUR, UNKNOWN_COLOUR = "#2e7d32", "#c62828", "#666"


@dataclass(frozen=True)
class Point:
    minutes: float
    label: str  # what the point is: read out by screen readers, shown on hover
    met: bool | None  # None: no objective to judge it by


def as_minutes(duration: dt.timedelta | None) -> float | None:
    return None if duration is None else duration.total_seconds() / 60


def format_minutes(value: float | None) -> str:
    """One decimal at most: 4.5, 30."""
    if value is None:
        return "-"
    return f"{value:.1f}".removesuffix(".0")


def axis_step(largest: float, most_ticks: int = 5) -> float:
    """A round tick interval (1, 2 or 5 times a power of ten) giving at most ``most_ticks``
    intervals up to ``largest``."""
    raw = largest / most_ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(f * magnitude for f in (1, 2, 5, 10) if f * magnitude >= raw)


def _anchor(x: float) -> str:
    # A label near either end of the axis grows inwards, so that it stays inside the chart.
    if x < PLOT_LEFT + 40:
        return "start"
    return "end" if x > PLOT_RIGHT - 40 else "middle"


def _mark(point: Point, x: float, y: float) -> str:
    # Shapes as well as colours, so met and breached differ in greyscale too.
    title = f"<title>{escape(point.label)}</title>"
    if point.met is None:
        return (
            f'<rect x="{x - 3.5:.1f}" y="{y - 3.5:.1f}" width="7" height="7" '
            f'fill="{UNKNOWN_COLOUR}">{title}</rect>'
        )
    if point.met:
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{MET_COLOUR}">{title}</circle>'
    return (
        f'<path d="M{x - 4:.1f},{y - 4:.1f} l8,8 m0,-8 l-8,8" stroke="{BREACHED_COLOUR}" '
        f'stroke-width="2.5">{title}</path>'
    )


def strip_chart(
    *,
    chart_id: str,
    title: str,
    points: Sequence[Point],
    median: float | None = None,
    p90: float | None = None,
    objectives: Sequence[float] = (),
) -> SafeString:
    """One phase's durations in minutes as a strip of points (one per incident) against the
    objective's line, with the median as a solid and the 90th percentile as a dashed line."""
    largest = max([p.minutes for p in points] + list(objectives) + [p90 or 0], default=0)
    step = axis_step(largest) if largest > 0 else 1.0
    axis_max = step * max(1, math.ceil(largest / step - 1e-9))

    chart_id = escape(chart_id)

    def x_of(minutes: float) -> float:
        return PLOT_LEFT + (PLOT_RIGHT - PLOT_LEFT) * minutes / axis_max

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="strip-chart" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{chart_id}-title {chart_id}-desc">',
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">{escape(_description(points, median, p90, objectives))}'
        "</desc>",
        f'<line x1="{PLOT_LEFT}" y1="{AXIS_Y}" x2="{PLOT_RIGHT}" y2="{AXIS_Y}" stroke="#999"/>',
    ]
    for tick in range(round(axis_max / step) + 1):
        x = x_of(tick * step)
        parts.append(
            f'<line x1="{x:.1f}" y1="{AXIS_Y}" x2="{x:.1f}" y2="{AXIS_Y + 4}" stroke="#999"/>'
            f'<text x="{x:.1f}" y="{AXIS_Y + 16}" font-size="10" text-anchor="middle">'
            f"{round(tick * step, 6):g}</text>"
        )
    parts.append(
        f'<text x="{PLOT_RIGHT}" y="{AXIS_Y + 30}" font-size="10" text-anchor="end">minutes</text>'
    )
    for objective in objectives:
        x = x_of(objective)
        parts.append(
            f'<line class="objective" x1="{x:.1f}" y1="{LANE_TOP - 6}" x2="{x:.1f}" '
            f'y2="{AXIS_Y}" stroke="{BREACHED_COLOUR}" stroke-width="1.5" stroke-dasharray="2 2"/>'
            f'<text x="{x:.1f}" y="{LANE_TOP - 9}" font-size="10" text-anchor="{_anchor(x)}" '
            f'fill="{BREACHED_COLOUR}">objective {format_minutes(objective)}</text>'
        )
    for name, value, dash in (("median", median, ""), ("p90", p90, ' stroke-dasharray="5 3"')):
        if value is not None:
            x = x_of(value)
            parts.append(
                f'<line class="{name}" x1="{x:.1f}" y1="{LANE_TOP}" x2="{x:.1f}" '
                f'y2="{LANE_BOTTOM}" stroke="#333" stroke-width="2"{dash}>'
                f"<title>{name} {format_minutes(value)} min</title></line>"
            )
    middle = (LANE_TOP + LANE_BOTTOM) / 2
    for index, point in enumerate(points):
        # Spread points over five rows so that equal durations stay visible.
        parts.append(_mark(point, x_of(point.minutes), middle + (index % 5 - 2) * 8))
    legend = f"median {format_minutes(median)} (solid), p90 {format_minutes(p90)} (dashed)"
    parts.append(f'<text x="{PLOT_LEFT}" y="{AXIS_Y + 30}" font-size="10">{legend}</text>')
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every text above is escaped


def _description(
    points: Sequence[Point], median: float | None, p90: float | None, objectives: Sequence[float]
) -> str:
    if not points:
        return "No finished phase to show."
    judged = [p for p in points if p.met is not None]
    met = sum(1 for p in judged if p.met)
    parts = [
        f"{len(points)} incident(s)",
        f"median {format_minutes(median)} minutes",
        f"90th percentile {format_minutes(p90)} minutes",
    ]
    if objectives:
        parts.append(f"objective {', '.join(format_minutes(o) for o in objectives)} minutes")
    if judged:
        parts.append(f"{met} of {len(judged)} met it")
    return "; ".join(parts) + "."
