#!/usr/bin/env python3
"""Bootstrap for a fresh machine that has only Python 3.11: `python3 run.py demo` or `python3 run.py test`.

Creates `.venv` beside this file on first use, installs the pinned stack and dpvr (editable) into it,
then runs the command inside it. Anything after the command is passed through:
    python3 run.py test -k routing       # pytest arguments
    python3 run.py demo --out runs/demo  # `dpvr demo` arguments
    python3 run.py dpvr eval --help      # any dpvr command
"""
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".dpvr-installed"


def _install_fingerprint() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def ensure_env() -> None:
    if not PY.exists():
        print(f"[run.py] creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == _install_fingerprint():
        return
    print("[run.py] installing the pinned stack (first run only, ~1-2 min)", flush=True)
    pip = [str(PY), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # torch first and alone, by exact pin, so pip takes the CPU wheel and never resolves a CUDA build.
    subprocess.check_call(pip + ["torch==2.13.0"])
    subprocess.check_call(pip + ["-e", f"{ROOT}[test]"])
    STAMP.write_text(_install_fingerprint())


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in {"-h", "--help"}:
        print(__doc__)
        return 0
    cmd, rest = sys.argv[1], sys.argv[2:]
    ensure_env()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cmd == "test":
        argv = [str(PY), "-m", "pytest", *rest]
    elif cmd == "dpvr":
        argv = [str(VENV / "bin" / "dpvr"), *rest]
    else:
        argv = [str(VENV / "bin" / "dpvr"), cmd, *rest]
    return subprocess.call(argv, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
