"""Open a report in headless Chromium and read back what rendered (used by the demo's test).

`ensure_chromium()` installs Debian's chromium with apt-get when it is missing (CI runs as root on
a Debian machine); it raises with the reason when that is not possible.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def ensure_chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if shutil.which("apt-get") is None:
        raise RuntimeError("chromium is not installed and apt-get is not available to install it")
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, capture_output=True)
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError("apt-get installed chromium but no `chromium` is on PATH")
    return path


def render_check(report: str | Path, budget_ms: int = 5000) -> dict[str, int]:
    """Load the report, let its check script run, return {'images', 'broken', 'tables', 'empty'}."""
    chromium = ensure_chromium()
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [chromium, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom",
             Path(report).resolve().as_uri()],
            check=True, capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
    m = re.search(r'id="render-check">images (\d+) broken (\d+) tables (\d+) empty (\d+)<', dom)
    if m is None:
        raise RuntimeError("the report's render check did not run (no verdict in the rendered DOM)")
    return dict(zip(["images", "broken", "tables", "empty"], map(int, m.groups())))
