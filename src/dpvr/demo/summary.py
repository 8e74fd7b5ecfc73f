"""The demo's summary: one row per method (accuracy, trainable parameters, FLOPs and measured latency
against vanilla), printed as a table and written as a self-contained HTML report with the plots."""
from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dpvr.demo.report import figure, table, write_report  # noqa: E402
from dpvr.eval.metrics import FAMILIES, headline  # noqa: E402

LABELS = {"vanilla": "vanilla", "fastv": "FastV (K=2, R=50%)", "vtw": "VTW", "lf": "DPVR-LF (trained)"}


def summary_rows(evals: dict, bench: dict, split: int, run_json: Path) -> list[dict]:
    trained = json.loads(Path(run_json).read_text())["trainable_params"] if Path(run_json).exists() else None
    short = min(bench["prefill"], key=lambda r: (r["batch"], r["n_txt"]))  # the tiny model's prompt length
    rows = []
    for name, ev in evals.items():
        s = ev["scores"]
        rows.append({
            "method": name, "label": LABELS.get(name, name), "mean": s["mean"],
            "families": {f: headline(f, s[f]) for f in FAMILIES if f in s},
            "trainable": trained if name == "lf" else 0,
            "flop_ratio": short["flop_ratio"][name], "prefill_ratio": short["ratio"][name],
            "decode_ratio": bench["decode"][name]["ratio"],
            "n_txt": short["n_txt"],
        })  # fmt: skip
    return rows


def summary_text(rows: list[dict], evals: dict) -> str:
    fams = list(rows[0]["families"])
    head = f"{'method':<20}{'mean':>7}" + "".join(f"{f[:8]:>9}" for f in fams)
    head += f"{'trainable':>11}{'FLOPs':>7}{'prefill':>8}{'decode':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r['families'][f]:>9.3f}" for f in fams)
        lines.append(f"{r['label']:<20}{r['mean']:>7.3f}{cells}{r['trainable']:>11,d}{r['flop_ratio']:>7.2f}"
                     f"{r['prefill_ratio']:>8.2f}{r['decode_ratio']:>8.2f}")  # fmt: skip
    lines.append("accuracy: POPE F1, MME acc+, MMBench circular, else exact match; FLOPs/prefill/decode: ratio to "
                 f"vanilla (analytic prefill FLOPs; measured prefill time and cached decode ms/token at "
                 f"{rows[0]['n_txt']} text tokens)")  # fmt: skip
    return "\n".join(lines)


def plot_accuracy_vs_flops(rows: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, r in enumerate(rows):
        ax.scatter(r["flop_ratio"], r["mean"], s=60, color=f"C{i}", label=r["label"], zorder=3)
        ax.annotate(r["label"], (r["flop_ratio"], r["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("prefill FLOPs / vanilla (analytic)")
    ax.set_ylabel("mean benchmark score")
    ax.set_title("accuracy vs compute on digit scenes")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(run_json: Path, path: Path) -> Path:
    """The side branch's training and held-out loss against steps, with where the plateau stopped it."""
    from dpvr.train.plateau import held_out_curve

    record = json.loads(Path(run_json).read_text())
    train = [(h["step"], h["loss"]) for h in record["log_history"] if "loss" in h]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for curve, label in ((train, "training loss"), (held_out_curve(record["log_history"]), "held-out (val) loss")):
        if curve:
            ax.plot(*zip(*curve), marker=".", label=label)
    if record.get("stopped_at_plateau"):
        ax.axvline(record["steps"], color="grey", ls="--", label=f"held-out plateau: stopped at {record['steps']}")
    ax.set_xlabel(f"step (budget {record.get('max_steps', record['steps'])})"), ax.set_ylabel("loss"), ax.grid(alpha=0.3)
    ax.legend(fontsize=8), fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    return path


def build_report(out: Path, rows: list[dict], evals: dict, bench: dict, rec: dict) -> Path:
    fams = list(rows[0]["families"])
    summary = table(
        ["method", "mean", *fams, "trainable params", "FLOPs ratio", "prefill time ratio", "decode ratio"],
        [[r["label"], r["mean"], *(r["families"][f] for f in fams), f"{r['trainable']:,d}", r["flop_ratio"],
          r["prefill_ratio"], r["decode_ratio"]] for r in rows],  # fmt: skip
    )
    pope = table(["method", "subset", "accuracy", "F1", "yes-ratio"],
                 [[LABELS.get(n, n), k, v["accuracy"], v["f1"], v["yes_ratio"]]
                  for n, ev in evals.items() for k, v in ev["scores"].get("pope", {}).get("subsets", {}).items()])  # fmt: skip
    commands = table(["step", "command (rerun by hand)"],
                     [[p.parent.name, "dpvr " + " ".join(json.loads(p.read_text())["argv"])]
                      for p in sorted(out.glob("*/step.json"))])  # fmt: skip
    acc_png = plot_accuracy_vs_flops(rows, out / "accuracy_vs_flops.png")
    sections = [
        ("Summary", summary + f"<p class='note'>{html.escape(_note(rows))}</p>"),
        ("Visual saturation (dpvr analyze)", figure(out / "analyze" / "analysis.png", "per-layer statistics")
         + f"<p>Recommended split: <b>{rec['split']}</b>. {html.escape(rec['reason'])}</p>"),  # fmt: skip
        ("Accuracy vs FLOPs", figure(acc_png, "mean score against analytic prefill FLOPs")),
        ("Side-branch training (dpvr train)", figure(plot_training(out / "train" / "final" / "run.json",
                                                                    out / "training.png"), "DPVR-LF's loss curves")),  # fmt: skip
        ("Latency (dpvr bench: random weights of the same shape)", figure(out / "bench" / "bench.png", "prefill, decode, KV cache")),
        ("POPE by negative type", pope),
        ("How each number was made", commands),
    ]
    return write_report(out / "report.html", "dpvr demo: DPVR on the embedded tiny LLaVA", sections)


def _note(rows: list[dict]) -> str:
    return ("Scores are on the digit-scenes test split (per-family subsets as chosen by --eval-per-family). "
            "Latency ratios are measured on this machine with random weights of the same shape, interleaved, "
            "after warm-up: medians of the ratios of paired runs (prefill) and paired steps (decode).")  # fmt: skip
