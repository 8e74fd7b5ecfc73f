"""lmms-eval for real: `python -m lmms_eval --model dpvr_llava` on local tasks built from a digit-scenes
test split gives, per question, the replies and scores `dpvr eval` gives (vanilla and LF), and its
multiple-choice task picks the choice dpvr's own log-probabilities pick. Needs lmms-eval (the `[lmms]`
extra); `.ci/run` runs it in its own environment (.ci/lmms.sh). The plugin's pure parts are tested
here without lmms-eval too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpvr.eval.lmms_plugin import _gen_settings, lmms_loglikelihoods

MODES = {"vanilla": [], "lf": ["mode=lf"]}


def test_lmms_kwargs_for_other_models_are_ignored_with_one_warning(caplog, monkeypatch):
    from dpvr.eval import lmms_plugin

    monkeypatch.setattr(lmms_plugin, "_warned", set())
    settings, until = _gen_settings({"max_new_tokens": 3, "temperature": 0, "image_aspect_ratio": "pad", "until": []}, 8)
    assert settings == {"max_new_tokens": 3, "num_beams": 1, "do_sample": False} and until == []
    _gen_settings({"image_aspect_ratio": "original"}, 8)  # warned already
    assert sum("ignores generation kwargs ['image_aspect_ratio']" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="unsupported generation kwargs"):
        _gen_settings({"beam_width": 2}, 8)


def test_loglikelihoods_are_returned_as_lmms_eval_scores_them():
    # lmms-eval 0.7.3's multiple_choice takes argmin over the first values: the likeliest must be smallest
    values = lmms_loglikelihoods([(-3.0, False), (-0.5, True), (-7.0, False)])
    assert min(range(3), key=lambda i: values[i][0]) == 1 and values[1] == (0.5, True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[lmms]'; .ci/lmms.sh)")
    from dpvr.data.digit_scenes import ensure_benchmark
    from dpvr.eval.lmms_tasks import write_tasks

    root = tmp_path_factory.mktemp("lmms")
    data = ensure_benchmark(root / "bench", seed=5, scenes={"train": 1, "val": 1, "test": 8, "existence": 2, "all": 2}, progress=False)
    ids = write_tasks(data, root / "tasks")
    return root, data, ids


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")


def run_lmms(root: Path, mode: str, ids: dict[str, list[str]], launcher: tuple[str, ...] = (), env: dict | None = None,
             name: str | None = None) -> tuple[dict, dict, subprocess.CompletedProcess]:
    """({task: aggregate}, {task: {sample id: (reply or None, score)}}, the process) of one lmms_eval run; launcher:
    the command that starts it (python -m lmms_eval by default)."""
    from dpvr.eval.lmms_tasks import TASKS
    from dpvr.loading import resolve_model_path

    out = root / f"out-{name or mode}"
    args = ",".join([f"pretrained={resolve_model_path(None)}", "dtype=float32", *MODES[mode]])
    cmd = [*(launcher or (sys.executable,)), "-m", "lmms_eval", "--model", "dpvr_llava", "--model_args", args,
           "--device", "cpu", "--batch_size", "8", "--include_path", str(root / "tasks"), "--tasks", ",".join(TASKS),
           "--log_samples", "--output_path", str(out)]  # fmt: skip
    res = subprocess.run(cmd, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=900)
    results = sorted(out.rglob("*_results.json"))
    # lmms-eval can exit 0 after an error: the results file is the proof it ran
    assert res.returncode == 0 and results, f"lmms_eval failed (rc {res.returncode}):\n{res.stderr[-4000:]}"
    agg = json.loads(results[-1].read_text())["results"]
    samples = {}
    for task in TASKS:
        (path,) = sorted(out.rglob(f"*_samples_{task}.jsonl"))[-1:]
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        metric = "acc" if TASKS[task][1] == "multiple_choice" else "accuracy"
        samples[task] = {ids[task][r["doc_id"]]: (_reply(r), float(r[metric])) for r in rows}  # doc_id: row in the JSONL
    return agg, samples, res


def _reply(row: dict) -> str | None:
    resp = row["filtered_resps"]
    return resp if isinstance(resp, str) else None  # multiple choice: (loglik, greedy) pairs, no text


def run_dpvr_eval(root: Path, data: Path, mode: str) -> dict:
    out = root / f"dpvr-eval-{mode}"
    cmd = [sys.executable, "-m", "dpvr.cli", "eval", "--data", str(data), "--families", "pope,spatial", "--out", str(out),
           *(["--mode", "lf"] if mode == "lf" else [])]  # fmt: skip
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "eval.json").read_text())


def mc_reference(data: Path, mode: str, ids: list[str]) -> dict[str, float]:
    """1.0 where argmax over the choices of dpvr's summed log-probabilities is the right count."""
    from dpvr.data.digit_scenes import load_split
    from dpvr.eval.lmms_plugin import continuation_logprobs
    from dpvr.eval.lmms_tasks import COUNT_CHOICES, doc_to_visual
    from dpvr.loading import load_model

    model, processor = load_model(mode=None if mode == "vanilla" else mode)
    by_id = {s["id"]: s for s in load_split(data, "test")}
    out = {}
    for i in ids:
        s = by_id[i]
        image = doc_to_visual({"image": str(data / "images" / s["image"])})
        lps = continuation_logprobs(model, processor, [(s["conversations"][0]["value"], f" {c}", image) for c in COUNT_CHOICES])
        best = max(range(len(COUNT_CHOICES)), key=lambda k: lps[k][0])
        out[i] = float(COUNT_CHOICES[best] == s["meta"]["answer"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_lmms_eval_scores_equal_dpvr_eval_per_question(setup, mode):
    root, data, ids = setup
    agg, samples, res = run_lmms(root, mode, ids)
    assert res.stderr.count("dpvr_llava ignores generation kwargs ['image_aspect_ratio']") == 1, "warn once, not per batch"
    ref = run_dpvr_eval(root, data, mode)
    for task, family in (("dpvr_scenes_yesno", "pope"), ("dpvr_scenes_short", "spatial")):
        got = samples[task]
        assert sorted(got) == sorted(ids[task]), f"{task}: lmms-eval saw other questions"
        for sid in ids[task]:
            assert got[sid][0] == ref["replies"][sid], f"{task} {sid}: lmms-eval {got[sid][0]!r} vs dpvr eval {ref['replies'][sid]!r}"
        assert agg[task]["accuracy,none"] == pytest.approx(ref["scores"][family]["accuracy"], abs=1e-12)
    mc = samples["dpvr_scenes_mc"]
    want = mc_reference(data, mode, ids["dpvr_scenes_mc"])
    assert {k: v[1] for k, v in mc.items()} == want, "lmms-eval's multiple-choice picks differ from dpvr's log-probs"
    assert agg["dpvr_scenes_mc"]["acc,none"] == pytest.approx(sum(want.values()) / len(want), abs=1e-12)


ACCELERATE = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2")


@pytest.mark.slow
def test_lmms_eval_on_two_processes_equals_one_process(setup):
    """accelerate's data parallelism, as lmms-eval's own models run it: each rank answers its share of the
    documents and lmms-eval gathers them; every reply, score and aggregate equals one process's."""
    root, _, ids = setup
    one_agg, one, _ = run_lmms(root, "lf", ids, name="lf-one")
    two_agg, two, res = run_lmms(root, "lf", ids, launcher=(*ACCELERATE, "--main_process_port", "29584"),
                                    env={"ACCELERATE_USE_CPU": "1"}, name="lf-two")  # fmt: skip
    assert "Running on rank 1" in res.stdout + res.stderr, "no second rank ran"
    assert two == one, "two processes answered differently from one"
    assert two_agg == one_agg


@pytest.mark.slow
def test_two_cpu_processes_accelerate_cannot_join_are_refused_in_one_line(setup):
    root, _, _ = setup
    from dpvr.loading import resolve_model_path

    out = root / "out-torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29583", "-m",
           "lmms_eval", "--model", "dpvr_llava", "--model_args", f"pretrained={resolve_model_path(None)}", "--device",
           "cpu", "--include_path", str(root / "tasks"), "--tasks", "dpvr_scenes_yesno", "--output_path", str(out)]  # fmt: skip
    env = {k: v for k, v in _env().items() if k != "ACCELERATE_USE_CPU"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert "the launcher started 2 processes but accelerate sees 1" in res.stderr, res.stderr[-3000:]
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu" in res.stderr
    assert not list(out.rglob("*_results.json")), "it evaluated anyway"
