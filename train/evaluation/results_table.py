"""Markdown results tables in ``docs/evaluation.md``: one table per benchmark under its own
``## heading``, each new result a row appended to its table (never after another table's)."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

DOCS_PATH = Path(__file__).resolve().parent.parent.parent / "docs" / "evaluation.md"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def append_row(path: str | os.PathLike | None, title: str, row: dict, intro: str = "") -> Path:
    """Append ``row`` (plus the current UTC ``date``) to the table under ``## title`` in ``path``
    (default ``docs/evaluation.md``), creating the section, with ``intro`` above the table and a
    header from ``row``'s keys, when there is none. An existing header decides the column order;
    unknown keys are dropped, missing ones left blank."""
    path = Path(path) if path is not None else DOCS_PATH
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else ["# Evaluation"]
    values = {"date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M"), **row}
    heading = f"## {title}"
    if heading in lines:
        at = lines.index(heading) + 1
        while at < len(lines) and not lines[at].startswith("| "):
            at += 1
        if at == len(lines):
            raise ValueError(f"{path}: no table under '{heading}'")
        header = [c.strip() for c in lines[at].strip().strip("|").split("|")]
        end = at
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
    else:
        header = ["date", *(k for k in row if k != "date")]
        lines += ["", heading, ""] + ([intro, ""] if intro else [])
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        end = len(lines)
    lines.insert(end, "| " + " | ".join(_cell(values.get(c, "")) for c in header) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
