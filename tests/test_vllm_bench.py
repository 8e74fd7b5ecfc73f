"""`python -m dpvr.serve.vllm.bench` (a benchmark, not a test) runs end to end on the tiny LLaVA converted to
LF and writes the record docs/serving.md reads: vanilla and routed rates, their ratios, the analytic
prefill FLOP saving and the share of it measured. Timings are not asserted. Runs where vLLM is installed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/vllm.sh runs these tests)")


def test_bench_writes_rates_ratios_and_the_analytic_share(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    argv = ["--out", str(out), "--reps", "1", "--batch", "2", "--mixed", "3", "--decode-tokens", "2"]
    subprocess.run([sys.executable, "-m", "dpvr.serve.vllm.bench", *argv], check=True, env=env, timeout=600)
    record = json.loads(out.read_text())
    s, f = record["summary"], record["prefill_flops"]
    for side in ("vanilla", "routed"):
        assert set(s[side]) == {"prefill_tok_s", "decode_tok_s", "mixed_req_s"} == set(s["paired_speedup_median"])
        assert min(s[side].values()) > 0
        assert {len(v) for v in record["raw_seconds"][side].values()} == {1}
    assert s["routed_over_vanilla"]["prefill_tok_s"] == pytest.approx(s["routed"]["prefill_tok_s"] / s["vanilla"]["prefill_tok_s"])
    assert record["routing"]["mode"] == "lf" and f["image_tokens"] == 144 and f["text_tokens"] > 0
    assert 0 < f["routed_flops"] < f["vanilla_flops"] and f["saving"] == pytest.approx(1 - f["routed_flops"] / f["vanilla_flops"])
    assert f["share_of_analytic_saving"] == pytest.approx(f["measured_time_saving"] / f["saving"])
    assert out.with_suffix(".png").stat().st_size > 10_000
