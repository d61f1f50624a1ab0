"""Results of `bench serve` and `bench trace`: a JSON file and a section of BENCHMARKS.md that a
rerun of the same benchmark replaces (other sections are left as they are)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


def update_section(markdown: Path, key: str, body: str) -> None:
    """Puts `body` between this key's markers in `markdown`, in place of what was there, or at
    the end of the file."""
    begin, end = f"<!-- {key}: begin -->", f"<!-- {key}: end -->"
    section = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = markdown.read_text() if markdown.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    markdown.write_text(text)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def distribution(figures: dict, digits: int = 1) -> str:
    """mean / median / p99 of a distribution_ms entry."""
    return " / ".join(number(figures[key], digits) for key in ("mean", "median", "p99"))


def targets_table(targets: list[dict]) -> str:
    rows = [[t["target"], t["measured"], "met" if t["met"] else "missed"] for t in targets]
    return table(["target", "measured", ""], rows) if rows else "(none at this run's settings)"
