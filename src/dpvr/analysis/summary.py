"""Per-sample statistics -> per-layer curves, transition layers and the recommended split.

    acc = Accumulator(); acc.add(batch_stats); acc.add_masking(ll, correct)   # per batch
    curves = acc.curves()                                      # dict of per-layer lists (mean and sem)
    rec = recommend_split(curves, collapse_frac=0.2, kl_frac=0.5, margin=2)
    print(rec.reason)

The rule (paper section 3.1: "attention has already collapsed but the prediction transition has not
yet occurred"): the attention collapse is the first layer, at or after the head-mean text-to-image
mass's peak, where the mass is <= collapse_frac x peak; the vision transition is the first layer from
which the image-position logit-lens KL stays <= kl_frac x its maximum. The split is the deepest layer
s with collapse <= s <= transition - margin whose mass is still collapsed (deeper = more of the image
stream's own computation kept, the safer end of the paper's plateau). When the window is empty the
reason says why and the split falls back to the paper's depth ratio (18/32).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from dpvr.analysis import MASK_TOL
from dpvr.analysis.saturation import BatchStats


def _mean_sem(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (N, L) -> per-column mean and standard error, ignoring NaN."""
    n = np.sum(~np.isnan(x), axis=0)
    with warnings.catch_warnings():  # all-NaN columns are expected (e.g. no text after an image): mean NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(x, axis=0) if x.size else np.full(x.shape[1:], np.nan)
        sd = np.nanstd(x, axis=0, ddof=1) if x.shape[0] > 1 else np.zeros(x.shape[1:])
        sem = np.where(n > 1, sd / np.sqrt(np.maximum(n, 1)), 0.0)
    return mean, sem


class Accumulator:
    """Keeps every sample's per-layer scalars (a few KB per sample) so means and errors are exact."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, stats: BatchStats) -> None:
        self._extend({k: v for k, v in vars(stats).items() if k != "image_attn"})  # ragged: attention_truth keeps it

    def add_masking(self, ll: torch.Tensor, correct: torch.Tensor) -> None:
        """(B, 1 + 2L) each, from `masking.score_variants` (may cover fewer samples than `add`)."""
        self._extend({"ll": ll, "correct": correct})

    def _extend(self, fields: dict[str, torch.Tensor]) -> None:
        for key, value in fields.items():
            self.parts.setdefault(key, []).append(value.detach().cpu().double().numpy())

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.parts.items()}

    def curves(self) -> dict:
        """Per-layer means (and sems) of every statistic; masking curves if scored."""
        a = self.arrays()
        out: dict = {"n_samples": int(a["cos_image"].shape[0]), "num_layers": int(a["cos_image"].shape[1])}
        for key in ("cos_image", "cos_text", "kl_image", "kl_text"):
            out[key], out[f"{key}_sem"] = _mean_sem(a[key])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            head_mean = np.nanmean(a["mass"], axis=2)  # (N, L): NaN only if a sample had no text after its image
        out["mass"], out["mass_sem"] = _mean_sem(head_mean)
        per_head = _heads(a["mass"])  # (L, H)
        filled = np.where(np.isnan(per_head), -np.inf, per_head)
        out["mass_max_head"] = np.where(np.isnan(per_head).all(1), np.nan, filled.max(1))  # (L,)
        out["mass_max_head_index"] = filled.argmax(1)
        if "ll" in a:
            L = out["num_layers"]
            ll, correct = a["ll"], a["correct"]  # (N, 1 + 2L)
            delta = ll - ll[:, :1]
            out["n_masking"] = int(ll.shape[0])
            out["ll_base"], out["acc_base"] = float(ll[:, 0].mean()), float(correct[:, 0].mean())
            for name, cols in (("only", slice(1, 1 + L)), ("onward", slice(1 + L, 1 + 2 * L))):
                out[f"dll_{name}"], out[f"dll_{name}_sem"] = _mean_sem(delta[:, cols])
                out[f"acc_{name}"] = correct[:, cols].mean(0)
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in out.items()}


def _heads(mass: np.ndarray) -> np.ndarray:
    """mass (N, L, H) -> (L, H) mean over samples of each head's share."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(mass, axis=0)


def collapse_layer(mass: list[float], frac: float) -> int | None:
    """First layer at or after the peak whose mass is <= frac x peak (None if it never collapses)."""
    m = np.asarray(mass, dtype=float)
    if np.all(np.isnan(m)):
        return None
    peak = int(np.nanargmax(m))
    for layer in range(peak, len(m)):
        if m[layer] <= frac * m[peak]:
            return layer
    return None


def transition_layer(kl: list[float], frac: float) -> int:
    """First layer from which the KL curve stays <= frac x its maximum (the last layer at worst: KL 0)."""
    k = np.nan_to_num(np.asarray(kl, dtype=float), nan=np.inf)
    limit = frac * np.max(k[np.isfinite(k)]) if np.isfinite(k).any() else 0.0
    layer = len(k) - 1
    while layer > 0 and k[layer - 1] <= limit:
        layer -= 1
    return layer


@dataclass
class Recommendation:
    split: int
    in_window: bool  # False: the attention window was empty; `split` is the masking curve's or the depth-ratio fallback
    collapse_layer: int | None
    vision_transition: int
    text_transition: int
    collapse_frac: float
    kl_frac: float
    margin: int
    reason: str
    fusion_at: tuple[int, ...] = ()  # sparse fusion layers the masking curve suggests (empty: none/unscored)
    fusion_reason: str = ""




def masking_split(curves: dict, tol: float = MASK_TOL) -> int | None:
    """The shallowest layer s such that blocking text-to-image attention in every layer from l on costs
    at most `tol` nats of the answer's log-likelihood for every l >= s: where what the text takes from
    the image has saturated (the paper's masking view). None without the masking analysis, or when
    even the last layer alone costs more."""
    if "dll_onward" not in curves:
        return None
    drop = -np.nan_to_num(np.asarray(curves["dll_onward"], dtype=float), nan=np.inf)  # > 0: blocking hurts
    s = len(drop)
    while s > 1 and drop[s - 1] <= tol:
        s -= 1
    return s if s < len(drop) else None


def recommend_split(curves: dict, collapse_frac: float = 0.2, kl_frac: float = 0.5, margin: int = 2,
                    mask_tol: float = MASK_TOL) -> Recommendation:  # fmt: skip
    from dpvr.loading import default_split

    L = curves["num_layers"]
    mass = np.asarray(curves["mass"], dtype=float)
    c = collapse_layer(curves["mass"], collapse_frac)
    t_v = transition_layer(curves["kl_image"], kl_frac)
    t_t = transition_layer(curves["kl_text"], kl_frac)
    peak = int(np.nanargmax(mass)) if not np.all(np.isnan(mass)) else 0
    limit = collapse_frac * mass[peak]
    hi = min(t_v - margin, L - 1)
    found = [s for s in range(max(c if c is not None else L, 1), hi + 1) if mass[s] <= limit]
    common = dict(collapse_layer=c, vision_transition=t_v, text_transition=t_t, collapse_frac=collapse_frac,
                  kl_frac=kl_frac, margin=margin)  # fmt: skip
    if found:
        s = found[-1]
        reason = (f"split {s}: text-to-image attention collapsed at layer {c} (mass {mass[c]:.3f} <= "
                  f"{collapse_frac:g} x peak {mass[peak]:.3f} at layer {peak}; {mass[s]:.3f} at {s}), and the vision "
                  f"logit-lens transition (KL <= {kl_frac:g} x max from layer {t_v} on) is {t_v - s} layers later")  # fmt: skip
        return Recommendation(split=s, in_window=True, reason=reason, **common, **suggest_fusion_at(curves, s))
    if c is None:
        why = (f"text-to-image attention never collapses (min {np.nanmin(mass):.3f} > {collapse_frac:g} x peak "
               f"{mass[peak]:.3f}): no visual saturation by this criterion")  # fmt: skip
    else:
        why = (f"no collapsed layer before the vision transition: collapse at {c}, vision logit-lens transition at "
               f"{t_v} (margin {margin})")  # fmt: skip
    s = masking_split(curves, mask_tol)
    if s is not None:
        reason = (f"split {s} (masking curve): blocking text-to-image attention in every layer from {s} on costs "
                  f"{-curves['dll_onward'][s]:.3f} nats (<= {mask_tol:g}); {why}")  # fmt: skip
    else:
        s = default_split(L)
        reason = f"split {s} (fallback: 18/32 of depth): {why}"
    return Recommendation(split=s, in_window=False, reason=reason, **common, **suggest_fusion_at(curves, s))


def suggest_fusion_at(curves: dict, split: int, max_layers: int = 3, frac: float = 0.5) -> dict:
    """Sparse fusion layers (`DPVRConfig.fusion_at`) from the masking curve: the deep layers (>= split)
    where blocking text-to-image attention at that layer alone lowers the answer's log-likelihood by
    more than one standard error, and by at least frac x the largest such drop: where text still
    reads the image after the split. At most max_layers, the most harmful first. Empty (with the
    reason) when the masking analysis was not run or no deep layer qualifies."""
    if "dll_only" not in curves:
        return {"fusion_at": (), "fusion_reason": "no masking analysis: no fusion_at suggestion"}
    drop = -np.nan_to_num(np.asarray(curves["dll_only"], dtype=float), nan=0.0)  # > 0: blocking hurts
    sem = np.nan_to_num(np.asarray(curves["dll_only_sem"], dtype=float), nan=np.inf)
    deep = [i for i in range(split, len(drop)) if drop[i] > sem[i] and drop[i] > 0]
    if not deep:
        return {"fusion_at": (), "fusion_reason": f"no layer >= {split} loses likelihood beyond noise when its "
                "text-to-image attention is blocked: last-K fusion (fusion_layers)"}  # fmt: skip
    top = max(drop[i] for i in deep)
    chosen = sorted(sorted(deep, key=lambda i: -drop[i])[:max_layers])
    chosen = [i for i in chosen if drop[i] >= frac * top]
    where = ", ".join(f"{i} ({-drop[i]:+.3f} nats)" for i in chosen)
    return {"fusion_at": tuple(chosen), "fusion_reason": f"fusion_at {','.join(map(str, chosen))}: blocking "
            f"text-to-image attention at that layer alone costs the most log-likelihood after the split: {where}"}  # fmt: skip
