"""scripts/gpu_check.py (the GPU validation run, issue 20) keeps working on CPU: its equivalence stage
runs the suite's references through the same code it will run on a device, and fails loudly."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_on_cpu_writes_a_passing_equivalence_record(tmp_path):
    assert _script().main(["--device", "cpu", "--quick", "--stages", "equivalence", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "equivalence.json").read_text())
    assert record["all_ok"], record
    assert {r["attn"] for r in record["forward"]} == {"eager", "sdpa"}
    assert all(r["fp32_err"] <= record["fp32_atol"] for r in record["forward"])
    bf16 = [r for r in record["forward"] if "bf16_err" in r]
    assert bf16 and all(0 < r["bf16_stock_err"] and r["bf16_err"] <= 2 * r["bf16_stock_err"] for r in bf16)
    assert all(r["tokens_equal"] for r in record["generation"] if r["dtype"] == "float32")
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert summary["environment"]["device"] == "cpu" and summary["stages"]["equivalence"]["all_ok"]


def test_gpu_check_refuses_cuda_without_a_gpu(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal cannot happen")
    assert _script().main(["--device", "cuda", "--out", "/nonexistent-never-written"]) == 2
    assert "sees no GPU" in capsys.readouterr().err
