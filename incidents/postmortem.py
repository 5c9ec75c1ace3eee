"""The post-mortem as Markdown: a pure function of what ``selectors.postmortem_data`` gathered,
with no clock read and no query, so the same incident always gives the same bytes."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from incidents.models import (
    ActionItem,
    ChecklistItem,
    EscalationLevel,
    Incident,
    PostmortemAddendum,
    TimelineEntry,
)

PHASE_LABELS = {
    "detect": "Time to detect",
    "mitigate": "Time to mitigate",
    "recover": "Time to recover",
}
TIMESTAMP_ROWS = [
    ("Impact started", "impact_started"),
    ("Detected", "detected"),
    ("Mitigated", "mitigated"),
    ("Recovered", "recovered"),
]
NOT_WRITTEN = "_Not written._"

# What people typed stays Markdown (emphasis, lists, http links) but can carry no HTML and no
# link a viewer would run: wherever the file is shown (a wiki, a code host, an editor's
# preview), raw HTML and a `javascript:` link would be live.
# A "<" that could open a tag, a comment or an autolink is written as an entity (shown as "<").
HTML_OPENER = re.compile(r"<(?=[A-Za-z/!?])")
# A link or image, inline ``[text](dest)`` or defined ``[label]: dest``, whose destination is
# not http(s) or mailto loses its link syntax: its "]" is written as an entity (shown as "]").
UNSAFE_LINK = re.compile(r"\](?=[(:]\s*+(?!<?(?:https?://|mailto:)))", re.IGNORECASE)


@dataclass(frozen=True)
class PostmortemData:
    incident: Incident
    targets: list[str]
    timeline: list[TimelineEntry]
    checklist: list[ChecklistItem]
    action_items: list[ActionItem]
    addenda: list[PostmortemAddendum]
    objectives: list  # selectors.PhaseResult, one per phase


def utc(moment: dt.datetime | None) -> str:
    if moment is None:
        return "-"
    return f"{moment.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC"


def duration(value: dt.timedelta | None) -> str:
    if value is None:
        return "-"
    seconds = int(value.total_seconds())
    hours, rest = divmod(seconds, 3600)
    return (
        f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"
    )


def inert(text: str) -> str:
    """``text`` as Markdown that renders no HTML and links only to http(s) and mailto."""
    return HTML_OPENER.sub("&lt;", UNSAFE_LINK.sub("&#93;", text))


def cell(value) -> str:
    """One Markdown table cell: inert, pipes escaped, line breaks kept as <br>."""
    text = inert(str(value if value not in (None, "") else "-").strip())
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return "<br>".join(line.strip() for line in text.splitlines()) or "-"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return lines


def prose(text: str) -> str:
    return inert(text.strip()) or NOT_WRITTEN


def section(title: str, body: str | list[str]) -> list[str]:
    lines = body if isinstance(body, list) else [body]
    return [f"## {title}", "", *lines, ""]


def render_postmortem(data: PostmortemData) -> str:
    incident = data.incident
    lines = [f"# Post-mortem: incident #{incident.pk} — {inert(incident.title)}", ""]
    lines += [
        f"- **Scenario:** {incident.get_scenario_display()}",
        f"- **Severity:** {incident.get_severity_display()}",
        f"- **Status:** {incident.get_status_display()}",
        f"- **Commander:** {inert(incident.commander_name) or '-'}",
        f"- **Affected targets:** {inert(', '.join(data.targets)) or '-'}",
        f"- **Culprit migration:** {inert(incident.culprit_migration) or 'unknown'}",
        f"- **Escalation:** {EscalationLevel(incident.escalation_level).label}",
        f"- **Opened:** {utc(incident.opened_at)} by {inert(incident.opened_by)}",
        f"- **Closed:** {utc(incident.closed_at)}",
        "",
    ]
    lines += section("Summary", prose(incident.summary))
    lines += section("Impact", prose(incident.impact))
    lines += section(
        "Timeline (UTC)",
        table(
            ["When (UTC)", "Who", "What"],
            [[utc(entry.occurred_at), entry.actor_name, entry.text] for entry in data.timeline],
        ),
    )
    timestamps = table(
        ["Moment", "When (UTC)", "Set by"],
        [
            [
                label,
                utc(getattr(incident, f"{name}_at")),
                (getattr(incident, f"{name}_by") or "-")
                + (" (automatically)" if getattr(incident, f"{name}_auto") else ""),
            ]
            for label, name in TIMESTAMP_ROWS
        ],
    )
    objectives = table(
        ["Measure", "Took", "Objective", "Result"],
        [
            [
                PHASE_LABELS[result.phase],
                duration(result.elapsed),
                duration(result.objective),
                result.verdict,
            ]
            for result in data.objectives
        ],
    )
    lines += section("Recovery time against objectives", [*timestamps, "", *objectives])
    lines += section("Trigger", prose(incident.trigger))
    lines += section(
        "Root cause and contributing factors",
        [
            prose(incident.root_cause),
            "",
            "### Contributing factors",
            "",
            prose(incident.contributing_factors),
        ],
    )
    lines += section("Detection", prose(incident.detection))
    lines += section("Resolution", prose(incident.resolution))
    lines += section(
        "Lessons learned",
        [
            "### What went well",
            "",
            prose(incident.went_well),
            "",
            "### What went wrong",
            "",
            prose(incident.went_wrong),
            "",
            "### Where we got lucky",
            "",
            prose(incident.got_lucky),
        ],
    )
    if data.action_items:
        actions = table(
            ["#", "Action", "Type", "Owner", "Due", "Status", "Link"],
            [
                [
                    item.pk,
                    item.title,
                    item.get_kind_display(),
                    item.owner_name,
                    item.due_date.isoformat() if item.due_date else "-",
                    item.get_status_display(),
                    item.link,
                ]
                for item in data.action_items
            ],
        )
    else:
        actions = [f"None. Why: {prose(incident.no_action_items_reason)}"]
    lines += section("Action items", actions)
    lines += section("Prevention measures", prose(incident.prevention))
    lines += section("Process improvements", prose(incident.process_improvements))
    lines += section(
        "Validation checklist",
        table(
            ["Item", "Result", "Evidence", "Checked by", "When (UTC)"],
            [
                [
                    item.get_key_display(),
                    item.get_result_display() + (" (automatically)" if item.automatic else ""),
                    item.evidence,
                    item.checked_by,
                    utc(item.checked_at),
                ]
                for item in data.checklist
            ],
        ),
    )
    if data.addenda:
        addenda = []
        for addendum in data.addenda:
            addenda += [
                f"### {utc(addendum.added_at)}, {inert(addendum.added_by)}",
                "",
                inert(addendum.text.strip()),
                "",
            ]
        lines += section("Addenda", addenda[:-1])
    return "\n".join(lines).rstrip("\n") + "\n"
