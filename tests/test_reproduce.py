"""`dpvr reproduce --quick` runs every row and sweep end to end (toy sizes, untrained tiny LLaVA)."""
from __future__ import annotations

import json
import time

from dpvr.cli import main


def test_reproduce_quick(tiny_checkpoint, tmp_path):
    start = time.perf_counter()
    assert main(["reproduce", "--quick", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert time.perf_counter() - start < 300, "--quick must finish in under 5 minutes"
    results = {r["name"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert {"full fine-tune", "LoRA r=16", "LoRA r=64", "DPVR-PC", "DPVR-KV", "DPVR-LF"} <= set(results)
    p = {k: v["trainable_params"] for k, v in results.items()}
    assert p["DPVR-PC"] == p["DPVR-KV"] == p["DPVR-LF"] and p["LF D=2"] == 2 * p["DPVR-LF"]
    assert p["LoRA r=64"] == 4 * p["LoRA r=16"] and p["full fine-tune"] > p["LoRA r=64"]
    f = {k: v["flop_ratio"] for k, v in results.items()}
    assert f["DPVR-LF"] < 1 < f["DPVR-PC"] and f["full fine-tune"] == 1.0
    for png in ("loss_curves.png", "sweeps.png", "table.md"):
        assert (tmp_path / "out" / png).stat().st_size > 0
