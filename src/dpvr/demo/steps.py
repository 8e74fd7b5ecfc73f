"""Resumable pipeline steps: each step is a dpvr command run into its own folder, in-process, or as a
process of its own with `threads` CPU threads and its output in the folder's `log.txt` (so that
several steps can run side by side: `dpvr reproduce --jobs`).

A step is done when its folder holds `step.json` (written last, atomically) recording the exact
command line and the fingerprint of the model it read; a rerun with the same command line on the same
model reuses it, a changed command or a changed checkpoint (a retrained or upgraded default, which the
command line does not name) reruns it. So `dpvr demo` can be interrupted anywhere and rerun, and every
intermediate result is also something a user can reproduce by hand with the printed command.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dpvr.atomic import atomic_write_text
from dpvr.cli import main as dpvr_main
from dpvr.errors import DPVRError

STAMP = "step.json"
LOG = "log.txt"  # a step run as its own process: its stdout and stderr
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")  # what a checkpoint's function depends on


def model_fingerprint(path: str | Path) -> str:
    """Names, sizes and modification times of a checkpoint folder's weight and config files: cheap at
    any checkpoint size (no hashing of gigabytes), and changed by any rewrite of the weights."""
    files = sorted(f for f in Path(path).iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    return json.dumps([[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])


@dataclass
class Step:
    name: str
    argv: list[str]  # dpvr command line, e.g. ["analyze", "--out", "...", ...]
    out: Path
    pipeline: str = "demo"  # the command running the step, for its log lines
    model: str = ""  # `model_fingerprint` of the checkpoint the step reads
    reads: tuple[Path, ...] = ()  # other steps' outputs it reads (a trained adapter): retrained, the step reruns
    threads: int | None = None  # run as a process of its own with this many CPU threads; None: in-process

    def inputs(self) -> str:
        return json.dumps([model_fingerprint(p) if Path(p).is_dir() else None for p in self.reads])

    @property
    def command(self) -> str:
        return "dpvr " + shlex.join(self.argv)

    def done(self) -> bool:
        stamp = self.out / STAMP
        if not stamp.exists():
            return False
        record = json.loads(stamp.read_text())
        same_inputs = not self.reads or record.get("reads") == self.inputs()
        return record.get("argv") == self.argv and record.get("model", "") == self.model and same_inputs

    def run(self, fresh: bool = False) -> float:
        """Run (or reuse) the step; returns the seconds it took (0 when reused)."""
        if self.done() and not fresh:
            print(f"[{self.pipeline}] {self.name}: reusing {self.out} ({self.command})", flush=True)
            return 0.0
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / STAMP).unlink(missing_ok=True)
        print(f"[{self.pipeline}] {self.name}: {self.command}", flush=True)
        start = time.perf_counter()
        rc = dpvr_main(self.argv) if self.threads is None else self._in_a_process()
        if rc == 130:  # the step caught Ctrl-C: the demo was interrupted, it did not fail
            raise KeyboardInterrupt
        if rc != 0:
            log = "" if self.threads is None else f" (its output: {self.out / LOG})"
            raise DPVRError(f"{self.pipeline} step {self.name!r} failed (exit {rc}){log}; rerun it alone: "
                            f"{self.command} --debug")  # fmt: skip
        seconds = time.perf_counter() - start
        record = {"argv": self.argv, "model": self.model, "reads": self.inputs(), "seconds": seconds}
        atomic_write_text(self.out / STAMP, json.dumps(record, indent=2) + "\n")
        return seconds

    def _in_a_process(self) -> int:
        """`python -m dpvr.cli ARGV` with `threads` intra-op threads (torch reads OMP_NUM_THREADS at start)."""
        n = str(self.threads)
        env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, PYTHONUNBUFFERED="1")
        with open(self.out / LOG, "w") as log:
            return subprocess.run([sys.executable, "-m", "dpvr.cli", *self.argv], stdout=log, stderr=subprocess.STDOUT,
                                  env=env).returncode  # fmt: skip
