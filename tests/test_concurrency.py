"""Two processes building the same benchmark cache at once (`dpvr data` and `dpvr eval` on a fresh
$DPVR_CACHE): both succeed, on one complete copy, and no temp directory is left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

BUILD = """
import sys, time
from dpvr.data.digit_scenes import ensure_benchmark
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # both processes start building at the same moment
root = ensure_benchmark(sys.argv[1], seed=7, scenes={"train": 60, "val": 10, "test": 10, "existence": 2, "all": 2}, progress=False)
print(root)
"""


def test_two_processes_building_the_same_benchmark_both_succeed(tmp_path):
    out = tmp_path / "cache" / "digit-scenes"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.time() + 15  # past both processes' imports
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(out), str(start)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]  # fmt: skip
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, f"a concurrent build failed:\n{stderr[-3000:]}"
        assert stdout.strip() == str(out)
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["seed"] == 7 and manifest["samples"]["test"] > 0
    left = sorted(p.name for p in out.parent.iterdir() if p.name != out.name)
    assert all(not name.startswith(f".{out.name}.tmp") for name in left), f"temp dirs left behind: {left}"
