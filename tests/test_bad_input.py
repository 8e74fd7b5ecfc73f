"""The bad-input harness: every CLI command against bad inputs, in-process through `dpvr.cli.main`.

Each case asserts what a shell user relies on: a non-zero exit (2 for a usage error, 130 for Ctrl-C),
exactly one line on stderr naming the problem, no traceback, and no result file left where a rerun
would trust it. New commands and flags join CASES.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from dpvr.cli import COMMANDS, main

USAGE, ERROR, INTERRUPTED = 2, 1, 130


@pytest.fixture(scope="module")
def world(tiny_checkpoint, tmp_path_factory, digit_bench):
    """Paths the cases refer to by name: {ckpt}, {img}, {bench}, {adapter}, {empty_dir}, ..."""
    from dpvr.loading import load_model

    root = tmp_path_factory.mktemp("bad-input")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "img.png")
    (root / "empty_dir").mkdir()
    (root / "not_an_image.png").write_text("hello")
    (root / "empty.json").write_text("[]")
    (root / "truncated.json").write_text('[{"id": "a", "conversations": [')
    bench = digit_bench(5, train=4, val=2, test=2, existence=2, all=2)
    model, _ = load_model(model=str(tiny_checkpoint), mode="lf", split_layer=6)
    model.save_pretrained(root / "adapter", side_branch_only=True)
    (root / "bad_adapter").mkdir()
    model.save_pretrained(root / "bad_adapter", side_branch_only=True)
    text = (root / "bad_adapter" / "dpvr_adapter.json").read_text()
    (root / "bad_adapter" / "dpvr_adapter.json").write_text(text[: len(text) // 2])  # truncated mid-write
    (root / "corrupt_config").mkdir()
    (root / "corrupt_config" / "config.json").write_text('{"model_type": "llava", "text_config": {')
    samples = json.loads((bench / "train.json").read_text())  # their images are not under root/images: all skipped
    (root / "all_bad.json").write_text(json.dumps([x for x in samples if "image" in x][:2]))
    (root / "policy.json").write_text('{"default": [12]}')
    (root / "shallow_policy.json").write_text('{"default": [3]}')
    (root / "peft_like").mkdir()
    (root / "peft_like" / "README.md").write_text("not an adapter")
    names = {"img": "img.png", "not_image": "not_an_image.png", "empty_json": "empty.json",
             "truncated_json": "truncated.json", "all_bad": "all_bad.json", "policy": "policy.json",
             "shallow_policy": "shallow_policy.json",
             **{k: k for k in ("empty_dir", "adapter", "bad_adapter", "peft_like", "corrupt_config")}}
    return {"ckpt": str(tiny_checkpoint), "root": str(root), "bench": str(bench), **{k: str(root / v) for k, v in names.items()}}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr without progress bars: those are tqdm's, not messages)."""
    rc = main(argv)  # returns the exit code, usage errors included (no SystemExit for in-process callers)
    out, err = capsys.readouterr()
    lines = [seg for line in err.splitlines() for seg in line.split("\r")]
    return rc, out, "\n".join(x for x in lines if x.strip() and not PROGRESS_BAR.search(x))


PROGRESS_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")


GEN = ["generate", "--model", "{ckpt}", "--image", "{img}", "--prompt", "what is in the top left cell ?"]
EVAL = ["eval", "--model", "{ckpt}", "--data", "{bench}", "--out", "{out}"]
BENCH = ["bench", "--preset", "tiny", "--text-lens", "8", "--batches", "1", "--repeats", "1", "--new-tokens", "2",
         "--recompute-text-len", "0", "--no-train-step", "--modes", "lf", "--out", "{out}"]  # fmt: skip
TRAIN = ["train", "--model", "{ckpt}", "--split_layer", "6", "--max_steps", "1", "--output_dir", "{out}"]


def replace(argv: list[str], flag: str, value: str | None) -> list[str]:
    """argv with flag's value replaced (or the flag dropped when value is None, or appended when absent)."""
    argv = list(argv)
    if flag in argv:
        i = argv.index(flag)
        argv[i : i + 2] = [] if value is None else [flag, value]
    elif value is not None:
        argv += [flag, value]
    return argv


# (id, argv, expected exit, words the one stderr line must contain)
CASES = [
    ("unknown-command", ["bogus"], USAGE, ["unknown command 'bogus'"]),
    ("unknown-flag", ["eval", "--no-such-flag"], USAGE, ["unrecognized arguments: --no-such-flag"]),
    # generate
    ("generate-missing-image", replace(GEN, "--image", "{root}/missing.png"), ERROR, ["missing.png"]),
    ("generate-image-is-a-folder", replace(GEN, "--image", "{empty_dir}"), ERROR, ["cannot read image", "empty_dir"]),
    ("generate-image-not-an-image", replace(GEN, "--image", "{not_image}"), ERROR, ["cannot read image"]),
    ("generate-missing-model", replace(GEN, "--model", "{root}/no-such-model"), ERROR, ["--model", "no such file"]),
    ("generate-model-is-a-file", replace(GEN, "--model", "{img}"), ERROR, ["--model", "is a file"]),
    ("generate-zero-tokens", replace(GEN, "--max-new-tokens", "0"), USAGE, ["--max-new-tokens", ">= 1"]),
    ("generate-compare-stock", GEN + ["--compare"], USAGE, ["--compare needs a routed model"]),
    ("generate-split-out-of-range", GEN + ["--mode", "lf", "--split-layer", "40"], ERROR, ["split_layer"]),
    ("generate-fastv-ratio", GEN + ["--mode", "fastv", "--fastv-ratio", "1.5"], ERROR, ["fastv_ratio"]),
    ("generate-negative-side-depth", GEN + ["--mode", "lf", "--side-depth", "-1"], ERROR, ["side_depth"]),
    ("generate-adapter-empty-dir", GEN + ["--adapter", "{empty_dir}"], ERROR, ["neither dpvr_adapter.json"]),
    ("generate-adapter-wrong-dir", GEN + ["--adapter", "{peft_like}"], ERROR, ["peft_like", "neither"]),
    ("generate-adapter-missing", GEN + ["--adapter", "{root}/nope"], ERROR, ["--adapter", "no such file"]),
    ("generate-adapter-truncated-json", GEN + ["--adapter", "{bad_adapter}"], ERROR,
     ["bad_adapter/dpvr_adapter.json", "not valid JSON"]),
    ("generate-adapter-and-mode", GEN + ["--adapter", "{adapter}", "--mode", "vtw"], ERROR, ["conflicts with --adapter"]),
    ("generate-adapter-as-model", replace(GEN, "--model", "{adapter}"), ERROR, ["is an adapter"]),
    ("generate-corrupt-config", replace(GEN, "--model", "{corrupt_config}"), ERROR,
     ["corrupt_config/config.json", "not valid JSON"]),
    ("generate-shallow-fastv-drops-all", GEN + ["--mode", "lf", "--split-layer", "6", "--shallow-fastv", "--fastv-ratio",
                                                "1.0"], ERROR, ["fastv_ratio=1.0", "shallow_fastv"]),
    # eval
    ("eval-batch-size-0", EVAL + ["--batch-size", "0"], USAGE, ["--batch-size", ">= 1, got 0"]),
    ("eval-batch-size-negative", EVAL + ["--batch-size", "-3"], USAGE, ["--batch-size", "got -3"]),
    ("eval-limit-0", EVAL + ["--limit-per-family", "0"], USAGE, ["--limit-per-family", ">= 1"]),
    ("eval-no-family", EVAL + ["--families", ","], USAGE, ["--families", "names no family"]),
    ("eval-unknown-family", EVAL + ["--families", "pope,nope"], ERROR, ["unknown families", "nope"]),
    ("eval-missing-data", replace(EVAL, "--data", "{root}/nope"), ERROR, ["not a digit-scenes benchmark"]),
    ("eval-data-is-a-file", replace(EVAL, "--data", "{img}"), ERROR, ["not a digit-scenes benchmark"]),
    ("eval-missing-model", replace(EVAL, "--model", "./no-such-model"), ERROR, ["--model", "no such file"]),
    ("eval-contrast-strength-nan", EVAL + ["--contrast-strength", "nan", "--contrast-early", "2"], ERROR,
     ["contrast strength", "finite"]),
    ("eval-contrast-strength-word", EVAL + ["--contrast-strength", "x"], USAGE, ["--contrast-strength", "'x'"]),
    ("eval-contrast-layer-too-deep", EVAL + ["--contrast-strength", "1", "--contrast-early", "2", "--contrast-layers",
                                             "99"], ERROR, ["contrast layers [99] out of range"]),
    ("eval-contrast-layer-not-deeper", EVAL + ["--contrast-strength", "1", "--contrast-early", "9", "--contrast-layers",
                                               "4,12"], ERROR, ["contrast layers [4]", "deeper than early_layer"]),
    ("eval-contrast-early-too-deep", EVAL + ["--contrast-strength", "1", "--contrast-early", "99"], ERROR,
     ["contrast early_layer"]),
    ("eval-contrast-without-strength", EVAL + ["--contrast-early", "2"], USAGE, ["need --contrast-strength"]),
    ("eval-fusion-policy-missing", EVAL + ["--fusion-policy", "{root}/nope.json"], ERROR, ["no fusion policy at"]),
    ("eval-fusion-policy-truncated", EVAL + ["--fusion-policy", "{truncated_json}"], ERROR, ["not valid JSON"]),
    ("eval-fusion-policy-not-an-object", EVAL + ["--fusion-policy", "{empty_json}"], ERROR, ["'default' placement"]),
    ("eval-fusion-policy-stock-model", EVAL + ["--fusion-policy", "{policy}"], ERROR, ["this model is stock"]),
    ("eval-fusion-policy-shallow", EVAL + ["--adapter", "{adapter}", "--fusion-policy", "{shallow_policy}"],
     ERROR, ["names layers [3] outside the deep layers [6, 16)"]),
    ("generate-task-without-policy", GEN + ["--task", "pope"], USAGE, ["--task is read by --fusion-policy"]),
    ("eval-contrast-without-early", EVAL + ["--contrast-strength", "1"], USAGE, ["needs --contrast-early"]),
    ("generate-contrast-layer-twice", GEN + ["--contrast-strength", "1", "--contrast-early", "2", "--contrast-layers",
                                             "12,12"], ERROR, ["name a layer twice"]),
    # bench / breakdown / flops
    ("bench-text-lens-0", replace(BENCH, "--text-lens", "0"), USAGE, ["--text-lens", ">= 1, got 0"]),
    ("bench-text-lens-empty", replace(BENCH, "--text-lens", ","), USAGE, ["--text-lens", "at least one"]),
    ("bench-text-lens-word", replace(BENCH, "--text-lens", "8,x"), USAGE, ["--text-lens", "'x' is not an integer"]),
    ("bench-batches-0", replace(BENCH, "--batches", "0"), USAGE, ["--batches", ">= 1"]),
    ("bench-repeats-0", replace(BENCH, "--repeats", "0"), USAGE, ["--repeats", ">= 1"]),
    ("bench-new-tokens-0", replace(BENCH, "--new-tokens", "0"), USAGE, ["--new-tokens", ">= 1"]),
    ("bench-unknown-mode", replace(BENCH, "--modes", "lf,warp"), ERROR, ["unknown --modes", "warp"]),
    ("bench-unknown-preset", replace(BENCH, "--preset", "{root}/nope"), ERROR, ["unknown architecture preset"]),
    ("bench-split-out-of-range", BENCH + ["--split-layer", "0"], ERROR, ["split_layer"]),
    ("breakdown-repeats-0", ["breakdown", "--preset", "tiny", "--repeats", "0", "--out", "{out}"], USAGE, ["--repeats"]),
    ("breakdown-batch-0", ["breakdown", "--preset", "tiny", "--batch", "0", "--out", "{out}"], USAGE, ["--batch"]),
    ("flops-unknown-arch", ["flops", "--arch", "gpt-5"], USAGE, ["--arch", "invalid choice"]),
    # analyze / data
    ("analyze-zero-samples", ["analyze", "--model", "{ckpt}", "-n", "0", "--out", "{out}"], USAGE, ["--num-samples"]),
    ("analyze-missing-data", ["analyze", "--model", "{ckpt}", "--data", "{root}/nope.json", "--out", "{out}"], ERROR,
     ["nope.json"]),
    ("analyze-noise-top-0", ["analyze", "--model", "{ckpt}", "--noise-top", "0", "--out", "{out}"], ERROR, ["--noise-top"]),
    ("analyze-noise-rate-2", ["analyze", "--model", "{ckpt}", "--noise-rate", "2", "--out", "{out}"], ERROR, ["--noise-rate", "(0, 1]"]),
    ("analyze-noise-floor-neg", ["analyze", "--model", "{ckpt}", "--noise-floor", "-1", "--out", "{out}"], ERROR, ["--noise-floor"]),
    ("analyze-truth-query-unknown", ["analyze", "--model", "{ckpt}", "--truth-query", "image", "--out", "{out}"], USAGE,
     ["--truth-query", "invalid choice"]),
    ("analyze-review-tol-inf", ["analyze", "--model", "{ckpt}", "--review-tol", "inf", "--out", "{out}"], ERROR, ["--review-tol"]),
    ("data-out-not-empty", ["data", "--out", "{adapter}"], ERROR, ["exists but is not a complete"]),
    # serve (a missing serve extra would name itself instead: these are refused before that check)
    ("serve-missing-model", ["serve", "{root}/no-such-model", "--port", "0"], ERROR, ["no such file", "no-such-model"]),
    ("serve-model-twice", ["serve", "{ckpt}", "--model", "{adapter}"], USAGE, ["MODEL", "--model", "disagree"]),
    ("serve-port-out-of-range", ["serve", "--port", "70000"], USAGE, ["--port", "<= 65535, got 70000"]),
    # train
    ("train-mode-fastv", TRAIN + ["--mode", "fastv"], USAGE, ["--mode 'fastv'", "inference-only"]),
    ("train-mode-vtw", TRAIN + ["--mode", "vtw"], USAGE, ["--mode 'vtw'", "inference-only"]),
    ("train-mode-bogus", TRAIN + ["--mode", "bogus"], USAGE, ["--mode 'bogus'", "not a routing mode"]),
    ("train-method-bogus", TRAIN + ["--method", "adapters"], USAGE, ["--method 'adapters'"]),
    ("train-unknown-flag", TRAIN + ["--lerning_rate", "1"], USAGE, ["--lerning_rate"]),
    ("train-empty-data", TRAIN + ["--data", "{empty_json}"], ERROR, ["no samples to train on", "empty.json"]),
    ("train-truncated-data", TRAIN + ["--data", "{truncated_json}"], ERROR, ["cannot read LLaVA JSON", "truncated.json"]),
    ("train-missing-data", TRAIN + ["--data", "{root}/nope.json"], ERROR, ["nope.json"]),
    ("train-limit-0", TRAIN + ["--data", "{bench}/train.json", "--limit", "0"], ERROR, ["no samples", "--limit 0"]),
    ("train-lf-ideal", TRAIN + ["--fusion_layers", "0"], ERROR, ["LF-ideal"]),
    ("train-every-sample-skipped", TRAIN + ["--data", "{all_bad}", "--on_error", "skip"], ERROR,
     ["no training step ran", "2 missing_image", "final not written"]),
    ("train-missing-model", replace(TRAIN, "--model", "/no/such/model"), ERROR, ["--model", "no such file"]),
    ("train-fusion-policy-lora", TRAIN + ["--method", "lora", "--fusion_policy", "{policy}"], USAGE,
     ["--fusion-policy places a DPVR-LF side branch"]),
    ("train-fusion-policy-cached", TRAIN + ["--fusion_policy", "{policy}", "--shared_stack_cache", "{root}/cache"], USAGE,
     ["--shared-stack-cache would freeze"]),
    ("train-fusion-policy-shallow", TRAIN + ["--fusion-policy", "{shallow_policy}"], ERROR,
     ["names layers [3] outside the deep layers [6, 16)"]),
    ("train-distill-weight-above-1", TRAIN + ["--distill_weight", "1.5"], USAGE, ["distill_weight=1.5", "[0, 1]"]),
    ("train-distill-weight-negative", TRAIN + ["--distill-weight", "-0.5"], USAGE, ["distill_weight=-0.5", "[0, 1]"]),
    ("train-distill-temperature-0", TRAIN + ["--distill_weight", "0.5", "--distill_temperature", "0"], USAGE,
     ["distill_temperature=0.0", "> 0"]),
    ("train-distill-lora", TRAIN + ["--method", "lora", "--distill_weight", "0.5"], USAGE,
     ["--distill-weight", "--method dpvr", "--method lora"]),
    ("train-distill-shared-cache", TRAIN + ["--distill_weight", "0.5", "--shared_stack_cache", "{out}/cache"], USAGE,
     ["--distill-weight", "--shared-stack-cache"]),
    ("train-side-warmup-negative", TRAIN + ["--side_warmup_steps", "-1"], USAGE, ["side_warmup_steps=-1", ">= 1"]),
    ("train-side-warmup-scale-0", TRAIN + ["--side_warmup_steps", "2", "--side_warmup_lr_scale", "0"], USAGE,
     ["side_warmup_lr_scale=0.0", "(0, 1]"]),
    ("train-side-warmup-scale-above-1", TRAIN + ["--side_warmup_steps", "2", "--side-warmup-lr-scale", "2"], USAGE,
     ["side_warmup_lr_scale=2.0", "(0, 1]"]),
    ("train-side-warmup-full", TRAIN + ["--method", "full", "--side_warmup_steps", "2"], USAGE,
     ["--side-warmup-steps", "--method full"]),
    ("train-side-warmup-whole-run", TRAIN + ["--data", "{bench}/train.json", "--side_warmup_steps", "1"], ERROR,
     ["side_warmup_steps=1", "no step at the raised rate", "has 1 step"]),
    ("train-side-warmup-plateau-schedule", TRAIN + ["--data", "{bench}/train.json", "--side_warmup_steps", "1", "--max_steps",
     "3", "--lr_scheduler_type", "reduce_lr_on_plateau", "--eval_strategy", "steps", "--eval_steps", "1"], ERROR, ["--side-warmup-steps", "ReduceLROnPlateau", "step-wise"]),
    ("train-tiny-no-out", ["train-tiny"], USAGE, ["--out"]),
    # reproduce / demo (a step's own failure prints its line, then the pipeline's: checked at their options)
    ("reproduce-steps-0", ["reproduce", "--steps", "0", "--out", "{out}"], USAGE, ["--steps", ">= 1"]),
    ("reproduce-eval-0", ["reproduce", "--eval-per-family", "0", "--out", "{out}"], USAGE, ["--eval-per-family"]),
    ("reproduce-epochs-0", ["reproduce", "--epochs", "0", "--out", "{out}"], USAGE, ["--epochs", "> 0"]),
    ("reproduce-seeds-0", ["reproduce", "--seeds", "0", "--out", "{out}"], USAGE, ["--seeds", ">= 1"]),
    ("reproduce-missing-model", ["reproduce", "--model", "{root}/nope", "--out", "{out}"], ERROR, ["no such file"]),
    ("demo-train-steps-0", ["demo", "--train-steps", "0", "--out", "{out}"], USAGE, ["--train-steps", ">= 1"]),
    ("demo-eval-negative", ["demo", "--eval-per-family", "-1", "--out", "{out}"], USAGE, ["--eval-per-family"]),
]


def test_every_command_is_in_the_table():
    covered = {argv[0] for _, argv, _, _ in CASES}
    missing = set(COMMANDS) - covered
    assert not missing, f"commands without a bad-input case: {sorted(missing)}"


@pytest.mark.parametrize("argv,code,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_the_right_exit(world, tmp_path, capsys, argv, code, words):
    out = tmp_path / "out"
    argv = [a.format(out=out, **world) for a in argv]
    rc, stdout, stderr = run_cli(argv, capsys)
    lines = stderr.strip().splitlines()
    assert rc == code, f"exit {rc}, expected {code}; stderr: {stderr[-2000:]}"
    assert "Traceback" not in stderr and len(lines) == 1, f"not one line on stderr:\n{stderr[-3000:]}"
    words = [w.format(out=out, **world) for w in words]
    assert all(w in lines[0] for w in words), f"{lines[0]!r} does not name {words}"
    left = sorted(p.name for p in out.rglob("*") if p.suffix == ".json") if out.exists() else []
    assert not left, f"a failed run left result files a rerun could trust: {left}"


def test_interrupted_benchmark_build_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    import dpvr.data.digit_scenes as ds

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ds, "build_pretrain", interrupt)  # after the train split's images are written
    rc, _, stderr = run_cli(["data", "--out", str(tmp_path / "bench")], capsys)
    assert rc == INTERRUPTED and stderr.strip() == "dpvr data: interrupted", stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".bench.lock"], f"an interrupted build left {left} (only the lock file may stay)"


def test_interrupted_eval_writes_no_result(world, tmp_path, capsys, monkeypatch):
    import dpvr.eval.runner as runner  # dpvr eval imports evaluate from here when it runs

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "evaluate", interrupt)
    rc, _, stderr = run_cli(["eval", "--model", world["ckpt"], "--data", world["bench"], "--out", str(tmp_path)], capsys)
    assert rc == INTERRUPTED and stderr.strip() == "dpvr eval: interrupted", stderr
    assert not (tmp_path / "eval.json").exists()


def test_demo_ctrl_c_is_interrupted_exit_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C inside a step is the demo being interrupted (exit 130), not a failed step (exit 1)."""
    import dpvr.analysis.cli as analyze_cli

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(analyze_cli, "run", interrupt)
    rc, _, stderr = run_cli(["demo", "--out", str(tmp_path)], capsys)
    lines = stderr.strip().splitlines()
    assert rc == INTERRUPTED, f"exit {rc}: {stderr}"
    assert lines[-1] == "dpvr demo: interrupted" and "failed" not in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "analyze" / "step.json").exists()


def test_eval_never_reports_a_mean_over_zero_questions(world, tmp_path, capsys):
    """The library refuses an empty selection too; --limit-per-family 1 scores real questions."""
    from dpvr.errors import DPVRError
    from dpvr.eval.runner import evaluate
    from dpvr.loading import load_model

    model, processor = load_model(model=world["ckpt"])
    with pytest.raises(DPVRError, match="no test question selected"):
        evaluate(model, processor, world["bench"], families=["count"], limit_per_family=0, progress=False)
    rc, _, stderr = run_cli(["eval", "--model", world["ckpt"], "--data", world["bench"], "--out", str(tmp_path),
                             "--limit-per-family", "1", "--families", "count"], capsys)  # fmt: skip
    assert rc == 0, stderr
    assert json.loads((tmp_path / "eval.json").read_text())["n"] >= 1


def test_train_on_an_output_dir_another_run_holds_is_one_line(world, tmp_path, capsys):
    """Another run's lock, as a flock on .out.lock beside OUT (held here through a file of its own)."""
    import fcntl

    out = tmp_path / "out"
    with open(tmp_path / ".out.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        rc, _, stderr = run_cli([a.format(out=out, **world) for a in TRAIN], capsys)
    lines = stderr.strip().splitlines()
    assert rc == ERROR and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert f"{out} is in use by another dpvr train" in lines[0] and "--output_dir" in lines[0], lines[0]
    assert not out.exists()
