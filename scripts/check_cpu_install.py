#!/usr/bin/env python3
"""Checks run.py's CPU install path as an ordinary machine would see it: pip's configuration ignored
(PIP_CONFIG_FILE=/dev/null: no local wheel folders, no constraints, PyPI as the index), torch installed
by run.py's own first command, then dpvr[test]'s resolution (a dry run, with pip's report) must add no
nvidia / cuda / triton package. Needs PyPI; CI runs it (.ci/run).

    python3 scripts/check_cpu_install.py            # prints what was installed and resolved; exit 1 on a CUDA package

PyTorch's CPU index (download.pytorch.org/whl/cpu) cannot be reached from this project's machines, so
the torch wheel comes from a file:// index standing in for it: a folder holding the very CPU wheel that
index serves (torch-2.13.0+cpu, found in pip's configured wheel folders) beside PyPI for its
dependencies. Everything after torch comes from PyPI as it would for a user.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run  # noqa: E402  (the bootstrap whose commands are checked)

CUDA_MARKERS = ("nvidia", "cuda", "triton")


def stand_in_index(folder: Path) -> str:
    """A PEP 503 file index with the CPU torch wheel under torch/; '' where this machine has none."""
    wheel = run.local_cpu_wheel(Path(sys.executable))
    if wheel is None:
        return ""
    (folder / "torch").mkdir(parents=True)
    shutil.copy(wheel, folder / "torch" / wheel.name)
    return folder.as_uri()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        index = stand_in_index(tmp / "index")
        if not index:
            print("check_cpu_install: no local CPU wheel of torch to stand in for PyTorch's CPU index; skipped")
            return 0
        env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, DPVR_TORCH_INDEX=index)
        env.pop("PIP_FIND_LINKS", None)
        venv.EnvBuilder(with_pip=True).create(tmp / "venv")
        python = tmp / "venv" / "bin" / "python"
        torch_cmd, dpvr_cmd = run.install_commands(python, "cpu")
        # the stand-in index holds torch only; its dependencies (filelock, sympy, ...) come from PyPI here,
        # as the real CPU index serves them itself
        subprocess.check_call(torch_cmd + ["--extra-index-url", "https://pypi.org/simple"], env=env)
        report = tmp / "report.json"
        subprocess.check_call(dpvr_cmd + ["--dry-run", "--report", str(report)], env=env)
        installed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], env=env, check=True,
                                   capture_output=True, text=True).stdout  # fmt: skip
        names = [p["name"] for p in json.loads(installed)]
        names += [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
        torch_version = next(p["version"] for p in json.loads(installed) if p["name"] == "torch")
    cuda = sorted(n for n in names if any(m in n.lower() for m in CUDA_MARKERS))
    print(f"check_cpu_install: torch {torch_version}; {len(names)} packages installed or resolved; CUDA packages: {cuda or 'none'}")
    return 1 if cuda or "+cpu" not in torch_version else 0


if __name__ == "__main__":
    sys.exit(main())
