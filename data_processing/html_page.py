"""Self-contained HTML pages for the reports (data, run, model inspection): inline CSS, no
scripts, images by relative path. One place for the table and page markup every report shares."""

from __future__ import annotations

import html
from typing import Any

STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
         "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}")


def fmt_cell(v: Any) -> str:
    """A table cell: floats to 4 significant digits, ints with thousands separators, None as a dash."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table, every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt_cell(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(name: str) -> str:
    """An image by relative path."""
    return f"<img src='{html.escape(name)}' alt='{html.escape(name)}'>"


def page(title: str, sections: list[tuple[str, str]], intro: str = "") -> str:
    """The page: a title, optional intro HTML, then one ``<h2>`` per ``(heading, html)`` section."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [intro] if intro else []
    parts += [f"<h2>{html.escape(heading)}</h2>{content}" for heading, content in sections]
    parts.append("</body></html>")
    return "\n".join(parts)
