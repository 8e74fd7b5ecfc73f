"""The ground-truth attention figure (`attention_truth.AttentionTruth`), written next to analysis.png.

    plot_attention_truth(truth, "out/attention_truth.png", title="tiny-llava, n=200")

Panels: (a) the relevant cells' share of the answer query's image attention per layer, per family
(dotted: the family's area, i.e. what uniform attention would give); (b) enrichment = share / area
(1 = uniform); (c) the masking cost of blocking one layer alone, per family, the tail the late-review
rule reads shaded; (d) the share of image attention the persistent-noise positions take per layer;
(e) the mean share of every image token over samples and layers on the patch grid, noise positions
circled. Without ground truth (a) and (b) say so; without masking, (c) does.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no backend switch for the user's process, no global registry

from dpvr.analysis.attention_truth import AttentionTruth
from dpvr.analysis.grounding import GRID
from dpvr.atomic import atomic_write


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, wrap=True)
    ax.set_xticks([]), ax.set_yticks([])


def _grounding(a, b, truth: AttentionTruth) -> None:
    if not truth.grounding:
        for ax in (a, b):
            _empty(ax, "no ground truth in this data\n(no cell annotations)")
        return
    colors = {}
    for g in truth.grounding.values():
        x = np.arange(len(g.share))
        style = dict(color="black", lw=2) if g.family == "all" else {}
        (line,) = a.plot(x, g.share, marker="o", ms=2.5, label=f"{g.family} (n={g.n_samples})", **style)
        colors[g.family] = line.get_color()
        a.axhline(g.area, color=colors[g.family], ls=":", lw=0.8)
        b.plot(x, g.enrichment, marker="o", ms=2.5, color=colors[g.family], label=g.family,
               lw=2 if g.family == "all" else 1.5)  # fmt: skip
    a.set(title="(a) share of image attention on the relevant cells", xlabel="layer", ylabel="share", ylim=(0, 1))
    b.axhline(1, color="gray", lw=0.8)
    b.set(title="(b) enrichment: share / area (1 = uniform)", xlabel="layer", ylabel="enrichment")
    for ax in (a, b):
        ax.legend(fontsize=6.5), ax.grid(alpha=0.3)


def _review(c, truth: AttentionTruth) -> None:
    if not truth.late_review:
        _empty(c, "no masking analysis:\nno late-review flag")
        return
    for r in truth.late_review.values():
        x = np.arange(len(r.cost))
        mark = " REVIEW" if r.review else ""
        c.plot(x, r.cost, marker="o", ms=2.5, label=f"{r.family}{mark}", **({"color": "black", "lw": 2} if r.family == "all" else {}))
    r0 = next(iter(truth.late_review.values()))
    c.axvspan(r0.tail_start - 0.5, len(r0.cost) - 0.5, color="gray", alpha=0.15, label="tail")
    c.axhline(0, color="gray", lw=0.8)
    c.set(title="(c) masking cost of blocking layer l alone", xlabel="layer l", ylabel="nats lost (> 0 hurts)")
    c.set_yscale("symlog", linthresh=0.05)
    c.legend(fontsize=6.5), c.grid(alpha=0.3)


def _noise(d, e, truth: AttentionTruth) -> None:
    n = truth.noise
    if n is None:
        _empty(d, "no image attention"), _empty(e, "no image attention")
        return
    d.bar(np.arange(len(n.share)), n.share, color="tab:red", alpha=0.7)
    d.set(title=f"(d) persistent noise: share of image attention\n(top {n.top_k}, >= {n.floor:g}/N, in own top {n.top_k} of >= {n.min_rate:.0%} samples)",
          xlabel="layer", ylabel="share", ylim=(0, max(0.05, max(n.share) * 1.15)))  # fmt: skip
    d.grid(alpha=0.3)
    side = int(round(n.n_image_tokens**0.5))
    if side * side != n.n_image_tokens:
        _empty(e, f"{n.n_image_tokens} image tokens: not a square grid")
        return
    im = e.imshow(np.asarray(n.mean_share).reshape(side, side), cmap="viridis")
    e.figure.colorbar(im, ax=e, fraction=0.046)
    if side % GRID == 0:  # the digit-scenes cells' borders, for reading which cell a position lies in
        for k in range(1, GRID):
            e.axhline(k * side / GRID - 0.5, color="white", lw=0.6, alpha=0.6)
            e.axvline(k * side / GRID - 0.5, color="white", lw=0.6, alpha=0.6)
    for p in n.persistent:
        e.scatter([p.col], [p.row], s=60, facecolors="none", edgecolors="red", lw=1.2)
    e.set(title="(e) mean share per image token (noise circled)", xlabel="patch column", ylabel="patch row")


def plot_attention_truth(truth: AttentionTruth, path: str | os.PathLike, title: str = "") -> Path:
    """Write the PNG atomically and return its path."""
    fig = Figure(figsize=(15, 8.5))
    (a, b, c), (d, e, f) = fig.subplots(2, 3)
    _grounding(a, b, truth)
    _review(c, truth)
    _noise(d, e, truth)
    f.axis("off")
    f.text(0, 1, _summary(truth), va="top", ha="left", family="monospace", fontsize=8)
    if title:
        fig.suptitle(f"{title}: where the answer's query looks in the image")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def _summary(truth: AttentionTruth) -> str:
    import textwrap

    lines = [f"query: {truth.query}", f"samples: {truth.n_samples} ({truth.n_grounded} grounded)"]
    g = truth.grounding.get("all")
    if g is not None:
        best = int(np.argmax(g.enrichment))
        lines.append(f"all: enrichment {g.enrichment[0]:.2f} at layer 0, {g.enrichment[best]:.2f} at {best} (best),")
        lines.append(f"     {g.enrichment[-1]:.2f} at the last layer; area {g.area:.2f}")
    for r in truth.late_review.values():
        lines += textwrap.wrap(f"{r.family}: {'late review' if r.review else 'no late review'} "
                               f"(rise {r.rise:+.3f} at {r.peak_layer})", 60)  # fmt: skip
    return "\n".join(lines)
