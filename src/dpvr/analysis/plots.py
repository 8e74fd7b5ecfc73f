"""The analysis figure: the paper's Figure 2 (three views) on top, the masking curves below.

    plot_analysis(curves, recommendation, "out/analysis.png", title="llava-1.5-7b, n=200")

Panels: (a) adjacent-layer cosine, image vs text; (b) text-to-image attention mass, head mean and the
highest head; (c) logit-lens KL to the final layer, image vs text, with the transitions; (d) change in
the answer's log-likelihood when text-to-image attention is blocked at one layer / from a layer on;
(e) teacher-forced accuracy under the same blocking. The recommended split is a dashed line throughout.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no backend switch for the user's process, no global registry

from dpvr.analysis.summary import Recommendation
from dpvr.atomic import atomic_write

IMAGE_C, TEXT_C = "tab:orange", "tab:blue"


def _band(ax, x, mean, sem, color, label, style="-"):
    mean, sem = np.asarray(mean, float), np.asarray(sem, float)
    ax.plot(x, mean, style, color=color, label=label, marker="o", ms=3)
    ax.fill_between(x, mean - sem, mean + sem, color=color, alpha=0.2, lw=0)


def plot_analysis(curves: dict, rec: Recommendation, path: str | os.PathLike, title: str = "") -> Path:
    """Write the PNG atomically and return its path."""
    L = curves["num_layers"]
    x = np.arange(L)
    masking = "dll_only" in curves
    fig = Figure(figsize=(15, 8.5 if masking else 4.3))
    axes = fig.subplots(2 if masking else 1, 3, squeeze=False)
    (a, b, c) = axes[0]

    _band(a, x, curves["cos_image"], curves["cos_image_sem"], IMAGE_C, "image tokens")
    _band(a, x, curves["cos_text"], curves["cos_text_sem"], TEXT_C, "text tokens")
    a.set(title="(a) adjacent-layer cosine cos(h_in, h_out)", xlabel="layer", ylabel="cosine similarity")

    _band(b, x, curves["mass"], curves["mass_sem"], "tab:green", "head mean")
    b.plot(x, curves["mass_max_head"], "--", color="tab:green", alpha=0.6, label="max head")
    if rec.collapse_layer is not None:
        b.axvline(rec.collapse_layer, color="gray", ls=":", label=f"collapse ({rec.collapse_layer})")
    b.set(title="(b) text-to-image attention mass", xlabel="layer", ylabel="share of text attention on image", ylim=(0, None))

    _band(c, x, curves["kl_image"], curves["kl_image_sem"], IMAGE_C, "image tokens")
    _band(c, x, curves["kl_text"], curves["kl_text_sem"], TEXT_C, "text tokens")
    c.axvline(rec.vision_transition, color=IMAGE_C, ls=":", label=f"image transition ({rec.vision_transition})")
    c.axvline(rec.text_transition, color=TEXT_C, ls=":", label=f"text transition ({rec.text_transition})")
    c.set(title="(c) logit lens: KL(final || layer)", xlabel="layer", ylabel="KL (nats)")

    panels = [a, b, c]
    if masking:
        d, e, f = axes[1]
        _band(d, x, curves["dll_only"], curves["dll_only_sem"], "tab:red", "block at layer l only")
        _band(d, x, curves["dll_onward"], curves["dll_onward_sem"], "tab:purple", "block layers l..L-1")
        d.axhline(0, color="gray", lw=0.8)
        d.set(title="(d) masking: change in answer log-likelihood", xlabel="layer l", ylabel="delta log p(answer) (nats)")
        e.plot(x, curves["acc_only"], "o-", color="tab:red", ms=3, label="block at layer l only")
        e.plot(x, curves["acc_onward"], "o-", color="tab:purple", ms=3, label="block layers l..L-1")
        e.axhline(curves["acc_base"], color="gray", ls="--", label=f"no blocking ({curves['acc_base']:.2f})")
        e.set(title="(e) masking: teacher-forced answer accuracy", xlabel="layer l", ylabel="accuracy", ylim=(-0.02, 1.02))
        f.axis("off")
        f.text(0, 1, _summary_text(curves, rec), va="top", ha="left", family="monospace", fontsize=8.5, wrap=True)
        panels += [d, e]
    for ax in panels:
        ax.axvline(rec.split, color="black", ls="--", lw=1, label=f"recommended split ({rec.split})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path


def _summary_text(curves: dict, rec: Recommendation) -> str:
    import textwrap

    mass = curves["mass"]
    lines = [
        f"samples: {curves['n_samples']}   layers: {curves['num_layers']}",
        f"mass: layer 0 {mass[0]:.3f}, min {np.nanmin(mass):.3f}, last {mass[-1]:.3f}",
        f"image cos >= {np.nanmin(curves['cos_image'][1:]) if len(mass) > 1 else float('nan'):.3f} from layer 1",
        f"answer log-lik (no blocking): {curves['ll_base']:.3f}",
        f"accuracy (no blocking): {curves['acc_base']:.3f}",
        "",
        *textwrap.wrap(rec.reason, 62),
    ]
    return "\n".join(lines)
