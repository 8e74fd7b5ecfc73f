"""dpvr demo end to end (small settings, untrained tiny LLaVA): every step runs, reruns reuse them,
and the HTML report renders in headless Chromium with every plot and table."""
from __future__ import annotations

import json

import pytest

from dpvr.cli import main
from dpvr.demo.browser import render_check
from dpvr.demo.steps import Step, model_fingerprint


@pytest.fixture(scope="module")
def demo(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--model", str(tiny_checkpoint), "--out", str(root / "out"), "--analyze-samples", "8",
            "--train-steps", "4", "--held-out", "8", "--eval-per-family", "4", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    return root, argv


def test_demo_writes_every_step_and_a_report_that_renders(demo):
    root, _ = demo
    out = root / "out"
    for step in ("analyze", "train", "eval-vanilla", "eval-fastv", "eval-vtw", "eval-lf", "bench"):
        assert json.loads((out / step / "step.json").read_text())["argv"], step
    check = render_check(out / "report.html")
    assert check == {"images": 4, "broken": 0, "tables": 3, "empty": 0}, check
    record = json.loads((out / "train" / "final" / "run.json").read_text())
    steps = [h["step"] for h in record["log_history"] if "eval_loss" in h]
    assert steps == list(range(len(steps))) and len(steps) >= 4, f"the held-out curve, from step 0: {steps}"


def test_demo_rerun_reuses_finished_steps(demo, capsys):
    root, argv = demo
    before = {p: p.stat().st_mtime for p in (root / "out").glob("*/step.json")}
    assert main(argv) == 0
    assert capsys.readouterr().out.count("reusing") == 7
    assert {p: p.stat().st_mtime for p in (root / "out").glob("*/step.json")} == before


def test_a_step_is_redone_when_the_checkpoint_it_reads_changes(tmp_path):
    """A rerun must not reuse results of another model: the default checkpoint is not on the command
    line, so a retrained or upgraded default would otherwise be served the old model's tables."""
    ck, out = tmp_path / "ck", tmp_path / "out"
    ck.mkdir(), out.mkdir()
    (ck / "config.json").write_text("{}")
    (ck / "model.safetensors").write_bytes(b"v1")
    step = lambda: Step("eval", ["eval", "--out", str(out)], out, model=model_fingerprint(ck))  # noqa: E731
    (out / "step.json").write_text(json.dumps({"argv": step().argv, "model": step().model}))
    assert step().done()
    (ck / "README.md").write_text("notes")  # not weights: still the same model
    assert step().done()
    (ck / "model.safetensors").write_bytes(b"v2, retrained in place")
    assert not step().done()
    (out / "step.json").write_text(json.dumps({"argv": step().argv}))  # a stamp from before fingerprints
    assert not step().done()


def test_an_evaluation_is_redone_when_the_adapter_it_reads_was_retrained(tmp_path):
    """The demo's LF evaluation names the same adapter folder whatever the training did: after a retraining
    (a new recipe, more steps) it served the old side branch's scores until steps recorded what they read."""
    adapter, out = tmp_path / "train" / "final", tmp_path / "eval"
    adapter.mkdir(parents=True), out.mkdir()
    (adapter / "side_branch.safetensors").write_bytes(b"300 steps")
    step = lambda: Step("eval lf", ["eval", "--adapter", str(adapter)], out, reads=(adapter,))  # noqa: E731
    (out / "step.json").write_text(json.dumps({"argv": step().argv, "model": "", "reads": step().inputs()}))
    assert step().done()
    (adapter / "side_branch.safetensors").write_bytes(b"retrained to its plateau")
    assert not step().done()
