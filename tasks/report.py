"""The keyed markdown report every flow run leaves behind: what it saw, decided, did and verified."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

SECTIONS = ("Observed", "Decided", "Done", "Verified")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<cred>[^/@\s]+)@", re.IGNORECASE)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def scrub(text: str) -> str:
    """Remove credentials from URLs and bearer tokens from free text before it is shown anywhere."""
    return _BEARER.sub(r"\1***", _URL_CREDENTIALS.sub(r"\g<scheme>***@", text))


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return scrub(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[Mapping[str, Any]], *, limit: int = 50) -> str:
    """Render dict rows as a markdown table (at most ``limit`` rows, then a count of the rest)."""
    rows = list(rows)
    if not rows:
        return "_none_"
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"\n_... and {len(rows) - limit} more_")
    return "\n".join(lines)


@dataclass
class Report:
    """A four-part report built up as a flow runs, then published once as a keyed markdown artifact."""

    title: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    outcome: str = "completed"
    parts: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SECTIONS})

    def add(self, section: str, text: str) -> None:
        """Append a paragraph (or bullet) to one of Observed / Decided / Done / Verified."""
        self.parts[section].append(scrub(text))

    def table(self, section: str, rows: Iterable[Mapping[str, Any]], *, caption: str = "", limit: int = 50) -> None:
        """Append a table to a section, with an optional caption line above it."""
        block = (f"**{scrub(caption)}**\n\n" if caption else "") + markdown_table(rows, limit=limit)
        self.parts[section].append(block)

    def to_markdown(self) -> str:
        head = [f"# {self.title}", "", f"Outcome: **{self.outcome}** · started {self.started_at:%Y-%m-%d %H:%M:%S} UTC"]
        body: list[str] = []
        for section in SECTIONS:
            body += ["", f"## {section}", ""]
            body += ["\n\n".join(self.parts[section]) or "_nothing_"]
        return "\n".join(head + body) + "\n"

    def publish(self, *, key: str, description: str | None = None) -> str:
        """Create the keyed markdown artifact (key: lowercase letters, digits, dashes) and return its markdown."""
        from prefect.artifacts import create_markdown_artifact

        markdown = self.to_markdown()
        create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description or self.title)
        return markdown


def artifact_key(text: str) -> str:
    """Turn any text into a valid Prefect artifact key."""
    key = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return key[:100] or "report"
