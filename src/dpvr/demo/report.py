"""A self-contained static HTML report: tables and PNG figures inlined, no script, nothing fetched when it opens.
tests/test_demo.py parses it (every figure decodes, every table has rows, no absolute path)."""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from dpvr.atomic import atomic_write_text

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.note { font-size: 0.85em; color: #555; }
td.l, th.l { text-align: left; }
code { font-size: 0.95em; }
.verdict { font-size: 1.05em; }
"""


def table(headers: list[str], rows: list[list], caption: str = "", left: tuple[int, ...] = (0,)) -> str:
    """An HTML table; floats get 3 decimals, None shows as a dash; the columns `left` are left-aligned (text)."""

    def cell(v) -> str:
        if v is None:
            return "&ndash;"
        if isinstance(v, float):
            return f"{v:.3f}"
        return html.escape(str(v))

    def cls(i: int) -> str:
        return ' class="l"' if i in left else ""

    head = "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{cell(v)}</td>" for i, v in enumerate(row)) + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(png: str | os.PathLike, caption: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip


def write_report(path: str | os.PathLike, title: str, sections: list[tuple[str, str]]) -> Path:
    """sections: (heading, inner HTML) in order. Written atomically."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(parts)
        + "\n</body></html>\n"
    )
    path = atomic_write_text(path, page)
    return path
