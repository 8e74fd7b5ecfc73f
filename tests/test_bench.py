"""`dpvr bench` on CPU: the peak-memory measurement and what the command records per mode."""
from __future__ import annotations

import json

import torch

from dpvr.bench import latency as lat
from dpvr.cli import main as dpvr_main

MB4 = 1000 * 1000 * 4  # one (1000, 1000) float32 tensor


def test_cpu_peak_memory_is_the_high_water_mark_of_what_fn_allocates():
    def fn():
        a = torch.ones(1000, 1000)
        b = a * 2  # two tensors live: the peak
        del a
        c = b + 1  # two again, never three
        return c

    peak = lat.peak_memory(fn, "cpu")
    assert 2 * MB4 <= peak < 2 * MB4 + 4096, f"peak {peak} bytes, expected 2 x {MB4} (+ scalars)"
    held = torch.zeros(2000, 1000)  # live before fn: not counted
    peak_with_held = lat.peak_memory(fn, "cpu")
    assert peak_with_held == peak, f"memory live before fn counted: {peak_with_held} vs {peak}"
    del held


def test_bench_records_peak_memory_and_kv_bytes_per_mode(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = dpvr_main(["bench", "--preset", "tiny", "--text-lens", "16", "--batches", "2", "--repeats", "1",
                    "--modes", "vanilla,lf,pc", "--new-tokens", "4", "--recompute-text-len", "0",
                    "--no-train-step", "--threads", "1", "--out", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 10_000
    (row,) = result["prefill"]
    kv = result["kv_cache_bytes"]
    for m in ("vanilla", "lf", "pc"):
        assert row["peak_bytes"][m] > 0 and result["decode"][m]["peak_bytes"] > 0, m
        # generating keeps the whole cache alive, so its peak is at least the cache it ends with
        assert result["decode"][m]["peak_bytes"] >= kv[m], f"{m}: peak {result['decode'][m]['peak_bytes']} < cache {kv[m]}"
    # LF's text-only deep layers hold 16 of 80 tokens: a smaller cache, and a smaller peak when generating
    assert kv["lf"] < 0.75 * kv["vanilla"], f"KV bytes lf {kv['lf']} vs vanilla {kv['vanilla']}"
    assert result["decode"]["lf"]["peak_bytes"] < result["decode"]["vanilla"]["peak_bytes"], result["decode"]
    assert "peak memory vs vanilla" in capsys.readouterr().out
