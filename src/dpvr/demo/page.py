"""The demo's report: what wins at what cost first (figure, table, the sentences), then where the analysis
routes, how each side branch trained, the latency bench, POPE by subset, and the command behind every step."""
from __future__ import annotations

import html
import json
import os
import shlex
from pathlib import Path

from dpvr.demo.figures import plot_cost_accuracy, plot_training
from dpvr.demo.report import figure, table, write_report
from dpvr.demo.summary import verdicts, versus

TRAIN_VS_HELD_OUT = (
    "The two curves score different questions, so the held-out loss sits below the training loss at every step and "
    "only their shapes compare: the training loss is over train.json's conversations (about 8 questions a scene, "
    "most of them which digit sits in a cell or the sum of two digits), the held-out loss over the first {n} "
    "questions of val.json (two thirds of them yes/no or one of four letters). The stock model, before any "
    "training, already scores lower on those {n} than on the first {n} training samples: scripts/heldout_gap.py "
    "measures it.")


def build_report(out: Path, rows: list[dict], rec, held_out: int = 256) -> Path:
    cost = plot_cost_accuracy(rows, out / "accuracy_vs_cost.png")
    sections = [
        ("What wins at what cost", _cost_section(rows, cost)),
        ("Where to route: dpvr analyze", _analysis_section(out, rec)),
        ("Side-branch training: dpvr train", _training_section(out, rows, held_out)),
        ("Latency: dpvr bench (random weights of the model's shape)", _bench_section(out)),
        ("POPE by negative type", _pope(rows)),
        ("How each number was made", _provenance(out)),
    ]
    return write_report(out / "report.html", "dpvr demo: DPVR on the embedded tiny LLaVA", sections)


def _cost_section(rows: list[dict], png: Path) -> str:
    fams = list(rows[0]["families"])
    summary = table(
        ["method", "configuration", "mean", "mean - vanilla's", *fams, "trainable params", "prefill FLOPs", "prefill time",
         "decode time"],
        [[r["method"], r["configuration"], f"{r['mean']:.3f}", versus(r).replace("+-", "±"), *(r["families"][f] for f in fams),
          f"{r['trainable']:,d}",
          f"{r['flop_ratio']:.2f}", f"{r['prefill_ratio']:.2f}", f"{r['decode_ratio']:.2f}"] for r in rows],
        left=(0, 1),
    )  # fmt: skip
    caption = ("Mean score over the question families against prefill cost, both relative to vanilla: analytic FLOPs "
               "(left) and measured time on this machine (right). The grey line is the front: for any cost on the "
               "x-axis, the last filled marker at or left of it is the most accurate method that costs no more. "
               "Hollow markers are beaten by a method that costs no more. Bars: ± the paired-bootstrap standard error of "
               "each method's mean minus vanilla's (the table's column): differences within about two of them are "
               "noise at this many questions.")  # fmt: skip
    said = "".join(f"<p class='verdict'>{html.escape(v)}</p>" for v in verdicts(rows))
    note = (f"Scores: the digit-scenes test split, the same questions for every method (POPE F1, MME acc+, MMBench "
            f"circular, else exact match); mean: over the image families. Mean - vanilla's: ± its standard error by a "
            f"paired bootstrap over the questions (MME pairs and MMBench groups drawn whole): a difference within about "
            f"two of them is not told apart from noise at this many questions. Costs: ratios to vanilla at batch 1, {rows[0]['n_txt']} text + "
            f"{rows[0]['n_img']} image tokens; time and decode are medians of paired, interleaved runs on this "
            "machine with random weights of the same shape (dpvr bench), FLOPs are analytic.")  # fmt: skip
    return figure(png, caption) + summary + said + f"<p class='note'>{html.escape(note)}</p>"


def _analysis_section(out: Path, rec) -> str:
    at = ",".join(map(str, rec.fusion_at)) or "none: LF fuses at the last layer (K = 1)"
    text = (f"<p>Recommended split: <b>{rec.split}</b>. {html.escape(rec.reason)}</p>"
            f"<p>Recommended fusion layers: <b>{html.escape(at)}</b>. {html.escape(rec.fusion_reason)}</p>"
            f"<p><code>dpvr eval --from {html.escape(_shown(str(out)))}</code> and <code>dpvr generate --from "
            f"{html.escape(_shown(str(out)))} ...</code> run this routing with the side branch trained for it here.</p>")  # fmt: skip
    caption = ("dpvr analyze on the stock model, per layer: (a) cosine between a token's states before and after the "
               "layer, (b) share of the text's attention on the image, (c) logit-lens KL to the last layer, (d, e) the "
               "answer's log-likelihood and accuracy with text-to-image attention blocked at layer l only (red) or in "
               "every layer from l on (purple). The split is where blocking every later layer costs almost nothing "
               "(purple near 0); the fusion layers are the deep layers where blocking one layer alone still costs "
               "more than its noise (red dips after the split).")  # fmt: skip
    return figure(out / "analyze" / "analysis.png", caption) + text


def _training_section(out: Path, rows: list[dict], held_out: int) -> str:
    parts = []
    for r in (r for r in rows if r["run_json"] is not None and r["run_json"].exists()):
        png = plot_training(r["run_json"], out / f"training-{r['run_json'].parent.parent.name}.png", r["method"])
        parts.append(figure(png, f"{r['method']} ({r['configuration']}): the side branch's loss against training "
                                 "step. " + TRAIN_VS_HELD_OUT.format(n=held_out)))  # fmt: skip
    return "".join(parts)


def _bench_section(out: Path) -> str:
    caption = ("Top row: prefill time relative to vanilla against text length (dashed: analytic FLOPs), cached decode "
               "ms per token, KV-cache bytes after prefill relative to vanilla. Bottom row: peak memory relative to "
               "vanilla, LF's measured prefill saving as a share of its analytic saving, and the run's settings.")  # fmt: skip
    return figure(out / "bench" / "bench.png", caption)


def _pope(rows: list[dict]) -> str:
    return table(["method", "subset", "accuracy", "F1", "yes-ratio"],
                 [[r["method"], k, v["accuracy"], v["f1"], v["yes_ratio"]] for r in rows
                  for k, v in r["pope_subsets"].items()], left=(0, 1))  # fmt: skip


def _provenance(out: Path) -> str:
    rows = [[p.parent.name, "dpvr " + shlex.join(_shown(a) for a in json.loads(p.read_text())["argv"])]
            for p in sorted(out.glob("*/step.json"))]  # fmt: skip
    note = "<p class='note'>Commands as run, from the folder the demo ran in (paths inside it relative to it).</p>"
    return table(["step", "command (rerun it by hand)"], rows, left=(0, 1)) + note


def _shown(arg: str) -> str:
    """An absolute path inside the current folder (the repository, for `python3 run.py demo`) relative to it."""
    if not (os.path.isabs(arg) and os.path.exists(arg)):
        return arg
    rel = os.path.relpath(arg)
    return arg if rel.startswith("..") else rel
