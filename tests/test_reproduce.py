"""`dpvr reproduce --quick` runs every row, sweep, measurement and verdict end to end (toy sizes,
untrained tiny LLaVA); the convergence rule and the verdict rules are checked on their own."""
from __future__ import annotations

import json
import shutil
import time

import pytest

from dpvr.cli import main
from dpvr.demo.reproduce.claims import verdicts
from dpvr.demo.reproduce.jobs import Job, run_jobs
from dpvr.train.plateau import plateau


@pytest.mark.e2e
def test_reproduce_quick(tiny_checkpoint, tmp_path):
    # No wall-clock assert: how long --quick takes depends on the machine and its load, and a timing target
    # is a measurement (about 5 minutes on 2 idle cores: 334 s in a fresh-clone run), not a test.
    out = tmp_path / "out"
    (before := tmp_path / "before").touch()  # what this call writes is newer than this stamp
    # an untrained model's masking curve puts the split at 1 (blocking costs nothing anywhere); the rows
    # are checked at a split with room for every one of them
    argv = ["reproduce", "--quick", "--model", str(tiny_checkpoint), "--split-layer", "9", "--jobs", "2", "--out", str(out)]
    assert main([*argv, "--keep-cache"]) == 0  # every run finished: the cache goes unless kept
    record = json.loads((out / "results.json").read_text())
    results = {r["name"]: r for r in record["rows"]}
    table2 = {"vanilla", "full fine-tune", "LoRA r=16", "LoRA r=64", "DPVR-PC", "DPVR-KV", "DPVR-LF", "DPVR-LF-ideal",
              "VTW", "FastV (K=2, R=50%)", "DPVR-LF + FastV"}  # fmt: skip
    assert table2 <= set(results)
    p = {k: v["trainable_params"] for k, v in results.items()}
    assert p["DPVR-PC"] == p["DPVR-KV"] == p["DPVR-LF"] and p["LF D=2"] == 2 * p["DPVR-LF"]
    assert p["LoRA r=64"] == 4 * p["LoRA r=16"] and p["full fine-tune"] > p["LoRA r=64"] and p["vanilla"] == 0
    f = {k: v["flop_ratio"] for k, v in results.items()}
    assert f["DPVR-LF"] < 1 < f["DPVR-PC"] and f["full fine-tune"] == 1.0
    assert f["DPVR-LF + FastV"] < f["DPVR-LF"] and f["DPVR-LF-ideal"] == f["VTW"]
    assert all(v["time_ratio"] > 0 for v in results.values())
    # every family's LR came from the sweep, and each trained row used its family's pick
    assert set(record["lr_sweep"]) == {"full", "lora", "pc", "lf"}
    assert results["DPVR-KV"]["learning_rate"] == results["DPVR-PC"]["learning_rate"] == record["lr_sweep"]["pc"]["chosen"]
    # two candidates: the best is at an edge, so each family tried one more beyond it
    assert all(len(v["losses"]) == 3 for v in record["lr_sweep"].values()), record["lr_sweep"]
    assert "Learning-rate sweep" in (out / "table.md").read_text()
    assert all(len(c) >= 3 for c in results["DPVR-LF"]["held_out_curves"]), "held-out loss logged along the way"
    g = record["side_branch_gradient"]
    assert g["lf_ideal"] == 0.0 < g["lf"], g
    assert {c["claim"].split(":")[0] for c in record["claims"]} >= {"LF matches PC/KV at lower cost", "beyond the paper"}
    assert [r["n_txt"] for r in record["table8"]] == [16] and "Table 8" in (out / "table.md").read_text()
    assert results["DPVR-KV"]["steps"] == results["DPVR-PC"]["steps"], "KV runs PC's trained side branch"
    # the DPVR rows trained from the shared-stack cache, per set (training, held-out): one file per split (9,
    # and the sweep's 7), and one per LF text path on from it (to the first fusion layer: 15, or 14 at K = 2)
    files = sorted(f.name.split("-", 1)[1] for f in (out / "shared-stack").glob("*.safetensors"))
    want = ["split7-text15", "split7", "split9-text14", "split9-text15", "split9"]
    assert files == sorted(f"{name}.safetensors" for name in want * 2), files
    # where the time went: every stage, from the steps' own records, which this run wrote (so they fit in it)
    minutes = record["minutes"]
    assert {"analysis", "learning-rate sweep", "DPVR-LF", "DPVR-KV", "LoRA r=16", "full fine-tune", "bench"} <= set(minutes)
    (call,), written = record["calls"], sorted(p.stat().st_mtime_ns for p in out.glob("*/step.json"))
    assert all(v > 0 for v in minutes.values()) and call["minutes"] > 0 and call["jobs"] == 2
    assert call["steps_run"] == len(written), "every step ran in this call"
    assert before.stat().st_mtime_ns <= written[0], "every step's record was written by this call, none reused"
    assert written[-1] <= (out / "calls.json").stat().st_mtime_ns, "the call's wall-clock was recorded after its last step"
    assert "Where the time went" in (out / "table.md").read_text()
    for name in ("loss_curves.png", "sweeps.png", "table.md", "claims.md", "saturation.png"):
        assert (out / name).stat().st_size > 0
    # past --minutes no run starts, and every finished one, earlier calls' included, is reported
    shutil.rmtree(out / "lora-r-64-seed0")
    sweep = sorted(out.glob("lr-sweep-full-*"))[0]
    shutil.rmtree(sweep)  # a cut learning-rate sweep: its family's rows are not trained either
    assert main([*argv, "--minutes", "0"]) == 0  # a tiny positive value would race the reused steps' milliseconds
    again = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert not (out / "lora-r-64-seed0").exists() and not sweep.exists()
    assert set(again) == set(results) - {"LoRA r=64", "full fine-tune"}
    assert again["DPVR-LF"]["mean"] == results["DPVR-LF"]["mean"]
    assert json.loads((out / "calls.json").read_text()) == [call], "a call that ran nothing adds no wall-clock"
    assert (out / "shared-stack").is_dir(), "runs are left for a later call: their cache stays"


def test_a_finished_reproduction_releases_its_shared_stack_cache(tmp_path):
    from dpvr.demo.recipe import CACHE_FOLDER, release_cache

    assert release_cache(tmp_path) is None, "no cache, nothing to say"
    (tmp_path / CACHE_FOLDER).mkdir()
    (tmp_path / CACHE_FOLDER / "key-split11.safetensors").write_bytes(b"x" * 2**20)
    assert "kept" in release_cache(tmp_path, keep=True) and (tmp_path / CACHE_FOLDER).is_dir()
    note = release_cache(tmp_path)
    assert "removed" in note and "0.0 GiB" in note and not (tmp_path / CACHE_FOLDER).exists()
    assert (tmp_path).is_dir(), "only the cache goes"


class Later(Exception):
    pass


def test_jobs_run_side_by_side_after_what_they_need():
    import threading

    log, lock, running = [], threading.Lock(), [0, 0]  # running: now, most at once

    def job(name, seconds=0.2, fail=None):
        def run(needs):
            with lock:
                log.append(("start", name, sorted(needs)))
                running[0] += 1
                running[1] = max(running)
            time.sleep(seconds)
            with lock:
                running[0] -= 1
            if fail:
                raise fail
            with lock:
                log.append(("end", name))
            return name.upper()
        return run

    jobs = [Job("a", job("a")), Job("b", job("b", fail=Later())), Job("c", job("c"), ("a",)), Job("d", job("d"), ("b",)),
            Job("e", job("e"))]  # fmt: skip
    done = run_jobs(jobs, 2, Later, desc="test")
    assert done["a"] == "A" and done["c"] == "C" and done["e"] == "E"
    assert isinstance(done["b"], Later) and isinstance(done["d"], Later), "a job needing a skipped one is skipped"
    assert ("start", "d", ["b"]) not in log and ("start", "c", ["a"]) in log
    assert log.index(("start", "c", ["a"])) > log.index(("end", "a")), "c starts after a ended"
    assert running[1] == 2, f"two at a time, side by side (most at once: {running[1]})"
    assert run_jobs(jobs[:1] + jobs[2:3], 1, Later, desc="test") == {"a": "A", "c": "C"}
    log.clear()  # one at a time, the given order among the ready ones: c as soon as a has run, before e
    running[1] = 0
    run_jobs([Job("a", job("a", 0)), Job("c", job("c", 0), ("a",)), Job("e", job("e", 0))], 1, Later, desc="test")
    assert [name for what, name, *_ in log if what == "start"] == ["a", "c", "e"] and running[1] == 1
    try:
        run_jobs([Job("x", job("x", fail=ValueError("boom"))), Job("y", job("y", 0.4))], 2, Later, desc="test")
    except ValueError as exc:
        assert str(exc) == "boom" and ("end", "y") in log, "a failure is raised after the running jobs end"
    else:
        raise AssertionError("the failure was swallowed")
    try:
        run_jobs([Job("p", job("p"), ("q",)), Job("q", job("q"))], 2, Later, desc="test")
    except ValueError as exc:
        assert "not earlier jobs" in str(exc)
    else:
        raise AssertionError("a need on a later job was accepted")


def test_plateau_rule():
    flat = [(s, 1.0 - 0.0001 * s) for s in range(0, 90, 10)]  # 0.8% over the whole run
    falling = [(s, 2.0 - 0.01 * s) for s in range(0, 90, 10)]
    assert plateau(flat)["plateaued"] and not plateau(falling)["plateaued"]
    assert not plateau(flat[:2])["plateaued"], "two points cannot show a plateau"


def test_a_held_out_evaluation_lands_at_the_first_chance_to_stop():
    from dpvr.demo.recipe import eval_every

    for steps, min_steps, points in [(774, 387, 12), (50, 17, 5), (1000, 999, 7), (9, 8, 3)]:
        every = eval_every(steps, points, min_steps)
        first = -(-min_steps // every) * every  # the first evaluation at or past min_steps
        assert first - min_steps < max(1, min_steps // points), (steps, min_steps, points, every)
        assert steps // every >= points - 1, "about `points` evaluations over the budget"
    assert eval_every(774, 12) == eval_every(774, 12, 774) == 64, "a run that cannot stop early: evenly"


def test_lr_sweep_goes_on_past_an_edge_until_the_best_is_interior():
    from dpvr.demo.reproduce.plan import LR_STEP, beyond_edge

    assert beyond_edge({1e-4: 0.5, 3e-4: 0.4, 1e-3: 0.45}) is None, "interior minimum: done"
    assert beyond_edge({1e-4: 0.3, 3e-4: 0.4, 1e-3: 0.45}) == float(f"{1e-4 / LR_STEP:.2g}"), "low edge: go lower"
    assert beyond_edge({1e-4: 0.5, 3e-4: 0.4, 1e-3: 0.35}) == float(f"{1e-3 * LR_STEP:.2g}"), "high edge: go higher"
    assert beyond_edge({1e-4: 0.5}) is None, "one candidate has no edge to go past"


def _rows(**means):
    base = {"flop_ratio": 1.0, "trainable_params": 10, "converged": True, "sweep": None, "std": {}}
    return {n: {**base, "name": n, "mean": {"mean": m}} for n, m in means.items()}


def test_verdicts_follow_the_numbers_and_refuse_unconverged_rows():
    rows = _rows(**{"DPVR-LF": 0.80, "DPVR-PC": 0.805, "DPVR-KV": 0.79})
    rows["DPVR-LF"]["flop_ratio"] = 0.7
    first = verdicts(rows, None)[0]
    assert first["verdict"] == "holds", first
    by_claim = {c["claim"]: c for c in verdicts(rows, None)}
    for claim in ("K = 1 fusion layer suffices", "D = 1 side layer suffices"):  # no sweep rows: nothing to compare
        assert by_claim[claim]["verdict"] == "undecided" and "sweep" in by_claim[claim]["evidence"], by_claim[claim]
    rows["DPVR-PC"]["mean"]["mean"] = 0.85
    assert verdicts(rows, None)[0]["verdict"] == "does not hold"
    rows["DPVR-KV"]["converged"] = False
    v = verdicts(rows, None)[0]
    assert v["verdict"] == "undecided" and "DPVR-KV" in v["evidence"]
    assert all(c["verdict"] == "undecided" for c in verdicts({}, None))


def test_plan_adds_sparse_fusion_rows_from_the_analysis_with_as_many_last_layers():
    from dpvr.demo.reproduce.plan import plan

    rows = {r.name: r for r in plan(False, 12, 7, fusion_at=(3, 8, 10))}  # layer 3 is before the split: dropped
    sparse, last = rows["LF fusion_at=8,10 (analyze)"], rows["LF last 2 (same count)"]
    assert sparse.routing["fusion_at"] == (8, 10) and "--fusion_at" in sparse.train
    assert last.routing["fusion_layers"] == 2 and "fusion_at" not in last.routing
    assert not any("fusion_at" in n for n in (r.name for r in plan(False, 12, 7)))


def test_the_split_sweep_spreads_its_points_from_layer_2_to_the_last_but_one():
    from dpvr.demo.reproduce.plan import SPLIT_POINTS, plan, split_points

    assert split_points(16) == [2, 8, 14] and split_points(32) == [2, 16, 30] and len(split_points(12)) == SPLIT_POINTS
    swept = lambda L, split: [r.sweep[1] for r in plan(False, L, split) if r.sweep and r.sweep[0] == "split"]  # noqa: E731
    assert swept(16, 11) == [2, 8, 14] and swept(16, 8) == [2, 14]  # the chosen split is Table 2's row, not repeated


def test_lf_plus_fastv_needs_room_for_fastv_before_the_split():
    """FastV prunes at layer 2 inside LF's shared stack [0, split): a split at or before it (the masking
    curve puts an untrained model's at 1) leaves no such row, and the claim says "rows not run"."""
    from dpvr.demo.reproduce.plan import plan

    names = lambda split: {r.name for r in plan(True, 16, split)}  # noqa: E731
    assert "DPVR-LF + FastV" in names(3)
    assert "DPVR-LF + FastV" not in names(2) and "DPVR-LF + FastV" not in names(1)
    assert "FastV (K=2, R=50%)" in names(1)


def test_table_2_comes_before_the_ablation_sweeps():
    """A reproduction cut short by --minutes has the paper's main table, baselines included."""
    from dpvr.demo.reproduce.plan import plan

    rows = plan(False, 16, 11, fusion_at=(11, 13))
    first_sweep = next(i for i, r in enumerate(rows) if r.sweep and r.name != "DPVR-LF-ideal")
    assert {r.name for r in rows[:first_sweep]} >= {"vanilla", "DPVR-LF", "DPVR-PC", "LoRA r=16", "full fine-tune", "LoRA r=64"}
    assert all(r.sweep for r in rows[first_sweep:])


def test_jobs_need_what_they_read_and_sweeps_alternate_cache_and_baselines():
    """The jobs `dpvr reproduce` runs side by side: LR sweeps first, a cache-filling family beside a
    baseline one; every trained row needs its family's sweep, KV and LF + FastV the seed's PC / LF run."""
    from types import SimpleNamespace

    from dpvr.demo.reproduce.command import _jobs
    from dpvr.demo.reproduce.plan import plan

    rep = SimpleNamespace(seeds_of=lambda row: [0, 1, 2] if row.trains or row.adapter_of else [None])
    jobs = {j.name: j for j in _jobs(rep, plan(False, 16, 11, fusion_at=(11, 13)))}
    assert list(jobs)[:4] == ["lr lf", "lr lora", "lr pc", "lr full"]
    assert jobs["DPVR-KV seed 1"].needs == ("DPVR-PC seed 1",) and jobs["DPVR-LF + FastV seed 2"].needs == ("DPVR-LF seed 2",)
    assert jobs["LoRA r=64 seed 0"].needs == ("lr lora",) and jobs["LF s=8 seed 2"].needs == ("lr lf",)
    assert jobs["vanilla"].needs == () and len(jobs) == 4 + 4 + 3 * 16  # sweeps, evaluation-only rows, 16 rows x 3 seeds
