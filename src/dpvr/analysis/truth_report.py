"""The printed section of the ground-truth attention analysis (`attention_truth.AttentionTruth`).

    print(format_truth(truth))

Per family: the relevant cells' share of the answer query's image attention and its enrichment
(share / area) at a few layers; the persistent-noise positions and their share per layer; the
late-review verdict per family. Every number is also in analysis.json["attention_truth"].
"""
from __future__ import annotations

import numpy as np

from dpvr.analysis.attention_truth import AttentionTruth


def _layers_shown(L: int) -> list[int]:
    # at most 6 columns keep the table narrow: first, last and evenly spaced between
    return sorted(set(np.linspace(0, L - 1, min(L, 6)).round().astype(int).tolist()))


def format_truth(truth: AttentionTruth) -> str:
    lines = [f"attention over the image, query = {truth.query}: {truth.n_samples} samples, "
             f"{truth.n_grounded} with ground truth"]  # fmt: skip
    if truth.grounding:
        L = len(next(iter(truth.grounding.values())).share)
        shown = _layers_shown(L)
        lines.append("relevant cells' share of image attention / enrichment (share / area) at layer:")
        lines.append(f"{'family':>16} {'n':>4} {'area':>5} " + " ".join(f"{f'L{i}':>11}" for i in shown) + f" {'best':>9}")
        for g in truth.grounding.values():
            best = int(np.argmax(g.enrichment))
            cols = " ".join(f"{g.share[i]:5.2f}/{g.enrichment[i]:5.2f}" for i in shown)
            lines.append(f"{g.family:>16} {g.n_samples:>4} {g.area:5.2f} {cols} {f'L{best} x{g.enrichment[best]:.2f}':>9}")
    else:
        lines.append("no ground truth in this data (no cell annotations): question-independent part only")
    lines += _noise_lines(truth)
    for r in truth.late_review.values():
        lines.append(f"late review [{r.family}, n={r.n_samples}]: {r.reason}")
    return "\n".join(lines)


def _noise_lines(truth: AttentionTruth) -> list[str]:
    n = truth.noise
    if n is None:
        return ["persistent noise: no sample with image attention"]
    head = (f"persistent noise (top {n.top_k} by mean share, >= {n.floor:g}/N, in own top {n.top_k} of >= {n.min_rate:.0%} samples; N = "
            f"{n.n_image_tokens}, {n.n_samples} samples): share of image attention per layer "
            + " ".join(f"{s:.2f}" for s in n.share))  # fmt: skip
    lines = [head]
    for p in n.persistent[:8]:
        where = f"patch ({p.row},{p.col})" if p.row is not None else f"token {p.index}"
        cell = f" cell {p.cell}" if p.cell is not None else ""
        rel = f", relevant in {p.relevant_rate:.0%} of grounded questions" if p.relevant_rate is not None else ""
        peak = max(p.mean_share)
        lines.append(f"  token {p.index} = {where}{cell}: noise at {len(p.layers)} layer{'s' if len(p.layers) > 1 else ''} "
                     f"({_ranges(p.layers)}), mean share up to {peak:.3f} (uniform {1 / n.n_image_tokens:.3f}){rel}")  # fmt: skip
    if len(n.persistent) > 8:
        lines.append(f"  ... {len(n.persistent) - 8} more in analysis.json")
    return lines


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ",".join(out)
