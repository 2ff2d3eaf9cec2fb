"""Read the tables of docs/conformance.md, so tests can hold the statement to the code."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"
UID_RE = re.compile(r"\b1\.2\.840\.10008(?:\.\d+)+\b")


def section(title: str, text: str | None = None) -> str:
    """The text under the heading ``title`` (any level), up to the next heading."""
    lines = (text if text is not None else DOC.read_text(encoding="utf-8")).splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#") and line.lstrip("#").strip() == title:
            body = []
            for rest in lines[i + 1:]:
                if rest.startswith("#"):
                    break
                body.append(rest)
            return "\n".join(body)
    raise AssertionError(f"docs/conformance.md has no heading {title!r}")


def table(title: str) -> list[list[str]]:
    """The rows of the first table under heading ``title``, without its header and rule, cells stripped."""
    rows = [line for line in section(title).splitlines() if line.startswith("|")]
    if len(rows) < 3:
        raise AssertionError(f"no table under {title!r} in docs/conformance.md")
    return [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows[2:]]
