#!/usr/bin/env python3
"""Bootstrap for a fresh machine that has only Python 3.11: `python3 run.py demo` or `python3 run.py test`.

Creates `.venv` beside this file on first use, installs torch, then dpvr (editable) with its test
extra, and runs the command inside it. Anything after the command is passed through:
    python3 run.py test -k routing       # pytest arguments
    python3 run.py demo --out runs/demo  # `dpvr demo` arguments
    python3 run.py dpvr eval --help      # any dpvr command

Which torch build (DPVR_TORCH=cpu|cuda overrides the guess):
    cpu   (no `nvidia-smi` on this machine): the CPU build, from PyTorch's CPU index (about 200 MB),
          as pytorch.org prescribes: PyPI's Linux wheels are CUDA builds that pull several GB of
          nvidia packages. A CPU wheel of the same version already in one of pip's own wheel
          folders (its find-links) is taken instead, offline.
    cuda  (an NVIDIA GPU): PyPI's build of the same torch version (CUDA).
DPVR_TORCH_INDEX replaces the CPU index (a mirror, or a file:// index in a test).
"""
import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".dpvr-installed"
TORCH = "torch==2.13.0"  # the version pyproject.toml pins; the build (CPU or CUDA) is chosen here
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def torch_build() -> str:
    choice = os.environ.get("DPVR_TORCH", "auto")
    if choice not in ("auto", "cpu", "cuda"):
        sys.exit(f"[run.py] DPVR_TORCH={choice!r}: use cpu, cuda or leave it unset")
    if choice == "auto":
        choice = "cuda" if shutil.which("nvidia-smi") else "cpu"
    return choice


def install_commands(python: Path, build: str) -> list[list[str]]:
    """The two pip commands that install torch (build: 'cpu' or 'cuda'), then dpvr[test]."""
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if build == "cuda":
        torch = [pip + [TORCH]]
    else:
        local = local_cpu_wheel(python)
        torch = [pip + [str(local)]] if local else [pip + ["--index-url", os.environ.get("DPVR_TORCH_INDEX", CPU_INDEX), TORCH]]
    return [*torch, pip + ["-e", f"{ROOT}[test]"]]


def local_cpu_wheel(python: Path) -> Path | None:
    """A CPU wheel of TORCH for this Python in one of pip's find-links folders (its configuration or
    PIP_FIND_LINKS), else None. Skipped when DPVR_TORCH_INDEX is set or pip's configuration is off."""
    if "DPVR_TORCH_INDEX" in os.environ or os.environ.get("PIP_CONFIG_FILE") == os.devnull:
        return None
    listed = subprocess.run([str(python), "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    folders = os.environ.get("PIP_FIND_LINKS", "").split()
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            folders += value.strip("'\"").split()
    version, tag = TORCH.split("==")[1], f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in folders:
        path = Path(folder.removeprefix("file://"))
        hits = sorted(path.glob(f"torch-{version}+cpu-{tag}-{tag}-*.whl")) if path.is_dir() else []
        if hits:
            return hits[0]
    return None


def _install_fingerprint() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + torch_build().encode()).hexdigest()


def ensure_env() -> None:
    if not PY.exists():
        print(f"[run.py] creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == _install_fingerprint():
        return
    build = torch_build()
    print(f"[run.py] installing torch ({build} build) and dpvr (first run only, 1-3 min)", flush=True)
    torch, dpvr = install_commands(PY, build)
    # torch first and alone, so that the dependency resolution below finds it satisfied and never
    # takes PyPI's CUDA build on a CPU machine
    if subprocess.call(torch) != 0:
        sys.exit(f"[run.py] could not install {TORCH} ({build} build): see pip's message above")
    subprocess.check_call(dpvr)
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
