"""A self-contained HTML report: tables and PNG figures inlined, nothing fetched when it opens.

A small script in the page checks, once loaded, that every image decoded and every table has rows,
and writes the verdict into #render-check, which `dpvr.demo.browser.render_check` reads back through
headless Chromium.
"""
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
#render-check { font-size: 0.7em; color: #aaa; }
"""

CHECK_SCRIPT = """
window.addEventListener("load", () => {
  const imgs = [...document.images], bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
  const tables = [...document.querySelectorAll("table")], empty = tables.filter(t => t.rows.length < 2);
  document.getElementById("render-check").textContent =
    `images ${imgs.length} broken ${bad.length} tables ${tables.length} empty ${empty.length}`;
});
"""


def table(headers: list[str], rows: list[list], caption: str = "") -> str:
    """An HTML table; floats get 3 significant decimals, None shows as a dash."""

    def cell(v) -> str:
        if v is None:
            return "&ndash;"
        if isinstance(v, float):
            return f"{v:.3f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
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
        + f"\n<div id='render-check'>pending</div><script>{CHECK_SCRIPT}</script></body></html>\n"
    )
    path = atomic_write_text(path, page)
    return path
