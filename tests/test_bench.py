"""`dpvr bench` on CPU: the peak-memory measurement, the paired timing, and what the command records per mode."""
from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import sys

import pytest
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
    # timings are paired: one sample per mode per round (prefill) and per decode step (4 new tokens: 3 steps)
    assert all(len(v) == 1 for v in row["samples"].values()), row["samples"]
    assert row["ratio"]["vanilla"] == 1.0 and result["decode"]["vanilla"]["ratio"] == 1.0
    assert row["ratio"]["lf"] == row["samples"]["lf"][0] / row["samples"]["vanilla"][0]
    assert "peak memory vs vanilla" in capsys.readouterr().out
    # page faults are counted per timed call, and on glibc the run says it kept freed memory
    assert all(row["minor_faults"][m] >= 0 and result["decode"][m]["minor_faults"] >= 0 for m in ("vanilla", "lf", "pc"))
    if platform.libc_ver()[0] == "glibc":
        assert result["cpu_malloc"].startswith("glibc"), result["cpu_malloc"]


class _RoutingRecorder:
    """Stands in for a converted model in `lat.interleaved`: records the mode each call ran under."""

    def __init__(self):
        self.mode, self.calls = None, []

    @contextlib.contextmanager
    def routing(self, mode, **_):
        self.mode = mode
        yield self


def test_interleaved_runs_rounds_abba_and_pairs_samples_by_round():
    model, modes = _RoutingRecorder(), ["vanilla", "lf", "pc"]
    slow = {0: 1.0, 1: 1.0, 2: 4.0, 3: 4.0, 4: 1.0}  # the machine's speed per round (0 is the warm-up)
    share = {"vanilla": 1.0, "lf": 0.5, "pc": 1.1}

    def fn(m):  # returns its own seconds: the mode's share of the current round's speed
        m.calls.append(m.mode)
        return slow[(len(m.calls) - 1) // len(modes)] * share[m.mode]

    samples = lat.interleaved(model, modes, fn, "cpu", repeats=4, warmup=1)
    assert model.calls[:9] == ["vanilla", "lf", "pc", "pc", "lf", "vanilla", "vanilla", "lf", "pc"], model.calls
    assert samples.seconds["lf"] == [0.5, 2.0, 2.0, 0.5], samples.seconds  # warm-up dropped, rounds in order
    for m in modes:
        assert abs(samples.ratio(m) - share[m]) < 1e-12, (m, samples.ratio(m))


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # lf is half of vanilla in two rounds; in the third the machine was slow for vanilla's run only
    s = lat.Samples({"vanilla": [1.0, 10.0, 10.0], "lf": [0.5, 5.0, 1.0]})
    assert s.ratio("lf") == 0.5, s.ratio("lf")  # a ratio of medians would say 1.0 / 10.0 = 0.1
    assert s.median("lf") == 1.0
    lo, hi = s.ratio_iqr("lf")
    assert 0.1 <= lo <= 0.5 == hi, (lo, hi)  # quartiles stay within the samples
    with pytest.raises(AssertionError, match="not paired"):
        lat.Samples({"vanilla": [1.0], "lf": [1.0, 2.0]}).ratio("lf")


# The worker imports what `dpvr bench` has imported when it calls keep_freed_memory() (the routed model
# classes, hence transformers' model code). In a process that has imported torch alone, the worker thread
# still faults 2,734 times a round with freed memory kept (glibc 2.36 here): docs/bench.md, "How the timings
# are taken". Before `import dpvr` became lazy, importing cpu_malloc pulled those classes in by itself.
# With memory kept, the worker takes its blocks from the main arena (M_ARENA_MAX 1, set here, not by
# keep_freed_memory): a thread's own arena grows by extra heaps, and glibc unmaps a heap that empties
# whatever the trim threshold, so whether a round faults depends on where the arena's blocks lie. On
# transformers 5.16-5.19, which import scikit-learn with the model code, that gave 1,173 or 6,838 faults a
# round in 4 of 6 runs, 0 in 6 of 6 with one arena. The cap stays out of keep_freed_memory(): in `dpvr bench`
# the intra-op threads would then share one arena's lock, a change to the timed calls themselves, and
# the bench already counts each timed call's page faults (bench.json), so a fault there is seen.
_WORKER_THREAD_FAULTS = """
import sys, threading, torch
import dpvr.routing.classes  # as dpvr bench's setup() has, before it keeps freed memory
from dpvr.bench.cpu_malloc import keep_freed_memory, minor_faults
setting = keep_freed_memory() if sys.argv[1] == "keep" else None
if setting:  # one arena (glibc's M_ARENA_MAX): see the note above
    import ctypes; ctypes.CDLL(None).mallopt(-8, 1)
def work():  # tensors of a few MiB, freed in a different order than made, as a forward frees activations
    a = torch.ones(2_000_000); b = torch.ones(6_000_000); del a
    c = torch.ones(1_000_000); del b
    d = torch.ones(7_000_000); del c, d
def worker():  # off the main thread, as an intra-op worker allocates: glibc serves it from another arena (default)
    for _ in range(3):
        work()
    before = minor_faults()
    for _ in range(5):
        work()
    print((minor_faults() - before) // 5, setting)
t = threading.Thread(target=worker); t.start(); t.join()
"""


def test_keep_freed_memory_stops_page_faults_from_freed_and_reused_tensor_memory():
    """The mechanism `dpvr bench` removes from CPU timings: glibc gives a non-main arena's freed memory back
    to the OS, so the same allocations fault their pages in again every time (~6,800 faults a round here)."""
    runs = {}
    for arg in ("default", "keep"):
        res = subprocess.run([sys.executable, "-c", _WORKER_THREAD_FAULTS, arg], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        faults, setting = res.stdout.strip().split(maxsplit=1)
        runs[arg] = (setting, int(faults))
    if platform.libc_ver()[0] != "glibc":
        assert runs["keep"][0] == "None", f"changed a non-glibc allocator: {runs['keep']}"
        return
    assert runs["keep"][0].startswith("glibc"), f"keep_freed_memory() did not apply: {runs['keep']}"
    assert runs["default"][1] > 1000, f"expected glibc's default to fault on reuse, got {runs['default'][1]} per round"
    assert runs["keep"][1] == 0, f"{runs['keep'][1]} page faults per round with freed memory kept"


def test_bench_at_a_split_where_lf_saves_nothing_still_writes_its_plot(tmp_path):
    """A split at the last layer: LF's side branch costs about what its one text-only layer saves (FLOP
    ratio >= 1), so its saving share is undefined; the plot says so instead of failing on empty data."""
    out = tmp_path / "bench"
    rc = dpvr_main(["bench", "--preset", "tiny", "--split-layer", "15", "--text-lens", "16", "--batches", "1",
                    "--repeats", "1", "--modes", "vanilla,lf", "--new-tokens", "2", "--recompute-text-len", "0",
                    "--no-train-step", "--threads", "1", "--out", str(out)])  # fmt: skip
    assert rc == 0
    assert json.loads((out / "bench.json").read_text())["prefill"][0]["flop_ratio"]["lf"] >= 1
    assert (out / "bench.png").stat().st_size > 10_000
