"""dpvr demo end to end (small settings, untrained tiny LLaVA): every step runs, reruns reuse them, the
static report holds every figure and table, says what wins at what cost as its table does, names no path
of this machine, and `dpvr eval/generate --from OUT` run the routing the demo's analysis recommends."""
from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

import pytest
from PIL import Image

from demo_claims import disagreements, noise_disagreements
from dpvr.cli import main
from dpvr.demo.steps import Step, model_fingerprint
from dpvr.recommended import read_recommendation, routing


@pytest.fixture(scope="module")
def demo(tiny_checkpoint, tmp_path_factory):
    """Run from a folder holding the checkpoint and the output, as `python3 run.py demo` runs in the repository."""
    root = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--model", str(tiny_checkpoint), "--out", str(root / "out"), "--analyze-samples", "8",
            "--train-steps", "4", "--held-out", "8", "--eval-per-family", "4", "--threads", "1"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.getbasetemp())
        assert main(argv) == 0
    return root, argv


class Page(HTMLParser):
    """The report's images (decoded), captions, tables (rows of cell texts) and paragraphs, in order."""

    def __init__(self, text: str):
        super().__init__()
        self.order, self.images, self.captions, self.tables, self.paragraphs = [], [], [], [], []
        self._cell, self._where = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(Image.open(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1]))))
            self.order.append("figure")
        elif tag == "table":
            self.tables.append([])
            self.order.append("table")
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th", "figcaption", "p"):
            self._cell, self._where = "", tag

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag != self._where:
            return
        {"figcaption": self.captions, "p": self.paragraphs}.get(tag, self.tables[-1][-1] if tag in ("td", "th") else [])\
            .append(self._cell.strip())
        self._cell = self._where = None


def steps_of(out):
    rec = read_recommendation(out)
    extra = ["train-at", "eval-lf-at", "bench-at"] if rec.fusion_at else []
    return ["analyze", "train", "eval-vanilla", "eval-fastv", "eval-vtw", "eval-lf", "bench", *extra]


@pytest.mark.e2e
def test_demo_writes_every_step_and_a_static_report(demo):
    root, _ = demo
    out = root / "out"
    for step in steps_of(out):
        assert json.loads((out / step / "step.json").read_text())["argv"], step
    text = (out / "report.html").read_text()
    page = Page(text)
    assert "<script" not in text and "render-check" not in text
    assert page.order[0] == "figure", "the accuracy-cost figure opens the report"
    n_lf = 2 if read_recommendation(out).fusion_at else 1
    assert len(page.images) == 3 + n_lf and all(im.size[0] >= 600 for im in page.images)  # cost, analysis, bench, training
    assert len(page.captions) == len(page.images) and all(len(c) > 40 for c in page.captions)
    assert len(page.tables) == 3 and all(len(t) >= 2 for t in page.tables)
    words = re.sub(r"data:image/png;base64,[^\"]*", "", text)
    assert str(root) not in words and not re.search(r"(?<![\w.])/(?:tmp|root|home|work|usr)/", words), "a machine's path"
    record = json.loads((out / "train" / "final" / "run.json").read_text())
    steps = [h["step"] for h in record["log_history"] if "eval_loss" in h]
    assert steps == list(range(len(steps))) and len(steps) >= 4, f"the held-out curve, from step 0: {steps}"


@pytest.mark.e2e
def test_the_sentences_under_the_table_agree_with_it(demo):
    """For each cost (FLOPs, measured time): the method named best up to each cost has the highest mean
    in the table among the methods at or below it, and every other method is said to be beaten."""
    root, _ = demo
    page = Page((root / "out" / "report.html").read_text())
    head, *body = page.tables[0]
    col = {h: head.index(h) for h in ("method", "mean", "prefill FLOPs", "prefill time")}
    sentences = [p for p in page.paragraphs if p.startswith(("By analytic", "By measured"))]
    assert len(sentences) == 2 and len(body) == 3 + (2 if read_recommendation(root / "out").fusion_at else 1)
    for sentence, cost in zip(sentences, ("prefill FLOPs", "prefill time")):
        table = [(r[col["method"]], float(r[col["mean"]]), float(r[col[cost]])) for r in body]
        assert disagreements(sentence, table) == [], sentence
    (said,) = [p for p in page.paragraphs if p.startswith("By a paired bootstrap")]
    versus = [(r[col["method"]], *map(float, r[head.index("mean - vanilla's")].split(" ± "))) for r in body[1:]]
    assert noise_disagreements(said, versus) == [], said


@pytest.mark.e2e
def test_a_rerun_reuses_finished_steps(demo, capsys):
    root, argv = demo
    before = {p: p.stat().st_mtime for p in (root / "out").glob("*/step.json")}
    assert main(argv) == 0
    assert capsys.readouterr().out.count("reusing") == len(steps_of(root / "out"))
    assert {p: p.stat().st_mtime for p in (root / "out").glob("*/step.json")} == before


@pytest.mark.e2e
def test_eval_from_the_demo_folder_runs_the_recommended_routing(demo, capsys):
    """`dpvr eval --from OUT` reads OUT's analysis (and the model it analysed), finds the side branch the demo
    trained for its routing, and scores exactly what the demo's own evaluation of that method scored."""
    root, _ = demo
    out = root / "out"
    cfg = routing(read_recommendation(out))
    key = "lf-at" if cfg.fusion_at else "lf"
    demo_eval = json.loads((out / f"eval-{key}" / "eval.json").read_text())
    assert main(["eval", "--from", str(out), "--limit-per-family", "4", "--out", str(root / "from")]) == 0
    printed = capsys.readouterr().out
    assert f"split {cfg.split_layer}" in printed and "side branch trained for it" in printed, printed
    assert json.loads((root / "from" / "eval.json").read_text())["scores"] == demo_eval["scores"]


@pytest.mark.e2e
def test_generate_from_the_demo_folder_and_a_clash(demo, capsys):
    root, _ = demo
    out = root / "out"
    argv = ["generate", "--from", str(out), "--image", str(out / "accuracy_vs_cost.png"), "--prompt", "which digit?",
            "--max-new-tokens", "2"]  # fmt: skip
    assert main(argv) == 0
    cfg = routing(read_recommendation(out))
    assert f"s={cfg.split_layer}" in capsys.readouterr().out
    assert main(["eval", "--from", str(out), "--mode", "vtw", "--out", str(root / "clash")]) == 2
    assert "drop --mode" in capsys.readouterr().err


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
