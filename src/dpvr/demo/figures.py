"""The demo's own figures: accuracy against prefill cost (the report's first), and each side branch's loss curves."""
from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # not pyplot: no backend switch for the user's process, no global registry

from dpvr.demo.summary import COSTS, front, shown

MARKERS = "osD^vP*X"


def plot_cost_accuracy(rows: list[dict], path: Path) -> Path:
    """Mean score against analytic prefill FLOPs (left) and measured prefill time (right), both against
    vanilla; the front (the most accurate method at or below each cost) joined by a line, its members
    filled, the methods it beats hollow; bars: +- the paired standard error of each mean minus vanilla's."""
    fig = Figure(figsize=(11, 4.6))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, cost in zip(axes, COSTS):
        top = front(rows, cost)
        xs = [shown(r, cost) for r in top] + [max(shown(r, cost) for r in rows)]  # the last stays best to the right
        ax.plot(xs, [shown(r, "mean") for r in top] + [shown(top[-1], "mean")], "-", color="0.55", lw=1.5, zorder=1,
                drawstyle="steps-post", label="front: best at or below each cost")  # fmt: skip
        for i, r in enumerate(rows):
            on = any(r is t for t in top)
            ax.errorbar(r[cost], r["mean"], yerr=r.get("vs_vanilla_se") or None, color=f"C{i}", capsize=3, lw=1, zorder=2)
            ax.scatter(r[cost], r["mean"], s=90, marker=MARKERS[i % len(MARKERS)], zorder=3, linewidths=1.8,
                       color=f"C{i}" if on else "white", edgecolors=f"C{i}", label=r["method"])  # fmt: skip
        ax.set_xlabel(f"{COSTS[cost]} / vanilla")
        ax.grid(alpha=0.3)
        ax.set_title(f"by {COSTS[cost]}" + (" (this machine)" if cost == "prefill_ratio" else ""), fontsize=11)
    axes[0].set_ylabel("mean score over the question families")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=120)
    return path


def plot_training(run_json: Path, path: Path, title: str) -> Path:
    """One side branch's training and held-out loss against steps, with where the plateau stopped it."""
    from dpvr.train.plateau import held_out_curve

    record = json.loads(Path(run_json).read_text())
    train = [(h["step"], h["loss"]) for h in record["log_history"] if "loss" in h]
    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    for curve, label in ((train, "training loss (train.json, mean since the last point)"),
                         (held_out_curve(record["log_history"]), "held-out loss (val.json)")):  # fmt: skip
        if curve:
            ax.plot(*zip(*curve), marker=".", label=label)
    if record.get("stopped_at_plateau"):
        ax.axvline(record["steps"], color="grey", ls="--", label=f"held-out plateau: stopped at step {record['steps']}")
    ax.set_xlabel(f"step (cap {record.get('max_steps', record['steps'])})")
    ax.set_ylabel("loss (nats per answer token)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
