"""The layer-wise attention analysis with ground truth (issue 41 item 4, after the related paper's
findings): where the answer's query looks in the image, per layer and per question family.

    acc = TruthAccumulator(top_k=5, min_rate=0.5, floor=2.0)
    acc.add(stats.image_attn, metas, questions)       # per batch, from measure_batch(..., attend_from=...)
    truth = acc.result(ll=masking_ll, families=masked_families, review_tol=0.05)
    truth.to_dict()                                   # -> analysis.json["attention_truth"]

The query is the last prompt token (its output predicts the first answer token; `--truth-query
question`: the mean over every text token after the image up to it); its head-mean attention over
the image keys is renormalised to a distribution over image tokens, p_l(j), per layer l.

1. **Grounding** (samples whose data says which cells the question is about, `grounding.py`): the
   share of p_l on the relevant cells' tokens (the rest is 1 - share) and the enrichment
   share / area, area = the relevant tokens' fraction of the image (1 = no better than uniform).
2. **Persistent noise** (question-independent, so also on data without ground truth): over all
   samples with the usual image-token count N, the mean m_l(j) of p_l(j) and its hit rate r_l(j),
   the fraction of samples in whose own top_k positions j is. Position j is noise at layer l when
   it is among the top_k by m_l, m_l(j) >= floor / N (floor x uniform) and r_l(j) >= min_rate: it
   draws a large share whatever the question and the scene (by chance r would be top_k / N). A hit
   rate rather than a variance bound, because attention shares are heavy-tailed: on the embedded
   default the most attended positions have cv = sd / mean of 0.6-3 even where most samples rank
   them near the top, so no cv bound separates them (cv is reported too). Reported: the positions per layer and the share of image attention they take
   (the sum of their m_l).
3. **Late review** (per family, from the masking curve): cost_l = the answer log-likelihood lost
   when text-to-image attention is blocked at layer l alone. Tail = the last max(2, L // 4) layers;
   trough = the lowest cost in [L // 2, tail) (or [1, tail) for shallow models), clipped at 0
   (a negative cost, blocking that helps, is noise). Review when the costliest tail layer's cost
   exceeds the trough by more than review_tol nats and by two standard errors, over at least 3
   samples: the image is read again just before the answer, after a quiet middle.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from dpvr.analysis.grounding import relevant_tokens, token_cells


@dataclass
class FamilyGrounding:
    family: str
    n_samples: int
    area: float  # mean fraction of the image tokens that cover the relevant cells
    share: list[float]  # per layer: mean share of image attention on the relevant tokens
    share_sem: list[float]
    rest: list[float]  # per layer: 1 - share (the other image tokens)
    enrichment: list[float]  # per layer: mean over samples of share / area (1 = uniform)
    enrichment_sem: list[float]


@dataclass
class NoisePosition:
    index: int  # image-token index (raster order of the patch grid)
    row: int | None  # patch row and column when the tokens form a square grid
    col: int | None
    cell: int | None  # digit-scenes cell it lies in (None: no cell grid)
    layers: list[int]  # layers where it is noise
    mean_share: list[float]  # per layer m_l(j)
    relevant_rate: float | None  # how often it covers a question's relevant cells (ground-truth samples)


@dataclass
class PersistentNoise:
    n_samples: int
    n_image_tokens: int
    top_k: int
    min_rate: float
    floor: float
    positions: list[list[int]]  # per layer: the noise positions
    share: list[float]  # per layer: share of image attention they take (sum of their mean shares)
    cv: list[list[float]]  # per layer: cv = sd / mean of each listed position, same order
    rate: list[list[float]]  # per layer: hit rate of each listed position, same order
    persistent: list[NoisePosition]  # every position that is noise at some layer, most layers first
    mean_share: list[float]  # per image token: mean share over samples and layers (the figure's map)


@dataclass
class LateReview:
    family: str
    n_samples: int
    cost: list[float]  # per layer: nats lost when text-to-image attention is blocked at that layer alone
    cost_sem: list[float]
    tail_start: int
    trough_layer: int
    peak_layer: int  # the tail layer with the largest rise over the trough
    rise: float  # cost[peak_layer] - cost[trough_layer]
    review: bool
    reason: str


@dataclass
class AttentionTruth:
    query: str  # which query's attention is measured
    n_samples: int
    n_grounded: int  # samples with ground truth (digit scenes with relevant cells)
    grounding: dict[str, FamilyGrounding]  # per family, plus "all"; empty without ground truth
    noise: PersistentNoise | None
    late_review: dict[str, LateReview] = field(default_factory=dict)  # per family, plus "all"; needs masking

    def to_dict(self) -> dict:
        return asdict(self)


def family_of(meta: dict | None) -> str:
    """The question family the analysis groups by: the data's own, MME split by category (its position
    and count questions have different relevant cells); "all" for data without digit-scenes meta."""
    if not isinstance(meta, dict) or "family" not in meta:
        return "all"
    fam = str(meta["family"])
    return f"{fam}/{meta['category']}" if fam == "mme" and "category" in meta else fam


def _mean_sem(x: np.ndarray) -> tuple[list[float], list[float]]:
    n = x.shape[0]
    sem = x.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(x.shape[1:])
    return x.mean(0).tolist(), sem.tolist()


class TruthAccumulator:
    """Keeps each sample's per-layer distribution over image tokens (L x N floats) and its ground truth."""

    def __init__(self, top_k: int = 5, min_rate: float = 0.5, floor: float = 2.0, grid_tokens: int | None = None):
        """grid_tokens: the model's patch-grid token count (`grounding.patch_grid_tokens`); images with
        another count get no cell mapping. None: any square count that the cell grid divides is trusted."""
        self.top_k, self.min_rate, self.floor, self.grid_tokens = top_k, min_rate, floor, grid_tokens
        self.dists: list[np.ndarray] = []  # (L, N_b) each, rows sum to 1
        self.masks: list[np.ndarray | None] = []  # (N_b,) bool relevant tokens, or None
        self.families: list[str] = []

    def add(self, image_attn: list[torch.Tensor], metas: list, questions: list) -> None:
        for att, meta, question in zip(image_attn, metas, questions, strict=True):
            a = att.double().numpy()  # (L, N)
            total = a.sum(-1, keepdims=True)
            if a.shape[1] == 0 or not np.all(total > 0):  # no image token, or no query: nothing to measure
                continue
            self.dists.append(a / total)
            grid = self.grid_tokens in (None, a.shape[1])
            self.masks.append(relevant_tokens(meta, question, a.shape[1]) if grid else None)
            self.families.append(family_of(meta))

    def grounding(self) -> dict[str, FamilyGrounding]:
        by_family: dict[str, list[int]] = {}
        for i, mask in enumerate(self.masks):
            if mask is not None:
                by_family.setdefault(self.families[i], []).append(i)
                by_family.setdefault("all", []).append(i)
        out = {}
        for fam in sorted(by_family, key=lambda f: (f == "all", f)):
            idx = by_family[fam]
            share = np.stack([self.dists[i][:, self.masks[i]].sum(-1) for i in idx])  # (S, L)
            area = np.array([self.masks[i].mean() for i in idx])  # (S,)
            s_mean, s_sem = _mean_sem(share)
            e_mean, e_sem = _mean_sem(share / area[:, None])
            out[fam] = FamilyGrounding(family=fam, n_samples=len(idx), area=float(area.mean()), share=s_mean,
                                       share_sem=s_sem, rest=[1 - s for s in s_mean], enrichment=e_mean,
                                       enrichment_sem=e_sem)  # fmt: skip
        return out

    def noise(self) -> PersistentNoise | None:
        if not self.dists:
            return None
        N = Counter(d.shape[1] for d in self.dists).most_common(1)[0][0]  # the usual image (anyres may vary)
        keep = [i for i, d in enumerate(self.dists) if d.shape[1] == N]
        found = find_persistent_noise(np.stack([self.dists[i] for i in keep]), self.top_k, self.min_rate, self.floor)
        masks = [self.masks[i] for i in keep if self.masks[i] is not None]
        side = int(round(N**0.5))
        grid = self.grid_tokens in (None, N)  # else row, column and cell would be a coincidence of the count
        cells = token_cells(N) if grid else None
        persistent = []
        for j, layers in sorted(found["layers_of"].items(), key=lambda kv: (-len(kv[1]), kv[0])):
            rate = float(np.mean([m[j] for m in masks])) if masks else None
            square = grid and side * side == N
            persistent.append(NoisePosition(
                index=j, row=j // side if square else None, col=j % side if square else None,
                cell=int(cells[j]) if cells is not None else None, layers=layers,
                mean_share=found["mean"][:, j].tolist(), relevant_rate=rate,
            ))  # fmt: skip
        return PersistentNoise(n_samples=len(keep), n_image_tokens=N, top_k=self.top_k, min_rate=self.min_rate,
                               floor=self.floor, positions=found["positions"], share=found["share"],
                               cv=found["cv"], rate=found["rate"], persistent=persistent,
                               mean_share=found["mean"].mean(0).tolist())  # fmt: skip

    def result(self, ll: np.ndarray | None = None, families: list[str] | None = None, review_tol: float = 0.05,
               query: str = "last prompt token") -> AttentionTruth:  # fmt: skip
        """ll (M, 1 + 2L): masking log-likelihoods of M samples (`masking.score_variants`), families their
        families; both None without the masking analysis."""
        grounding = self.grounding()
        reviews = late_reviews(ll, families, review_tol) if ll is not None and families else {}
        return AttentionTruth(query=query, n_samples=len(self.dists), n_grounded=sum(m is not None for m in self.masks),
                              grounding=grounding, noise=self.noise(), late_review=reviews)  # fmt: skip


def find_persistent_noise(p: np.ndarray, top_k: int, min_rate: float, floor: float) -> dict:
    """p (S, L, N): per sample and layer, a distribution over N image tokens. Noise at layer l: among
    the top_k by mean over samples, mean >= floor / N, and in the sample's own top_k in at least
    min_rate of the samples (see the module doc). cv = sd / mean is reported alongside."""
    S, L, N = p.shape
    k = min(top_k, N)
    mean, sd = p.mean(0), p.std(0)  # (L, N) each
    with warnings.catch_warnings():  # a position no sample attends: mean 0, cv undefined
        warnings.simplefilter("ignore", RuntimeWarning)
        cv = np.where(mean > 0, sd / mean, np.inf)
    # per sample and layer, the k most attended positions; rate = how often each position is one of them
    own_top = np.argsort(-p, axis=-1, kind="stable")[..., :k]  # (S, L, k)
    hits = np.zeros((L, N))
    for layer in range(L):
        hits[layer] = np.bincount(own_top[:, layer].ravel(), minlength=N) / S
    positions, share, cvs, rates, layers_of = [], [], [], [], {}
    for layer in range(L):
        top = np.argsort(-mean[layer], kind="stable")[:k]
        chosen = [int(j) for j in top if mean[layer, j] >= floor / N and hits[layer, j] >= min_rate]
        positions.append(chosen)
        share.append(float(mean[layer, chosen].sum()))
        cvs.append([float(cv[layer, j]) for j in chosen])
        rates.append([float(hits[layer, j]) for j in chosen])
        for j in chosen:
            layers_of.setdefault(j, []).append(layer)
    return {"positions": positions, "share": share, "cv": cvs, "rate": rates, "layers_of": layers_of, "mean": mean}


def late_review(cost: np.ndarray, sem: np.ndarray, tol: float, n: int = 3) -> dict:
    """The late-review rule (module doc) on one per-layer cost curve (nats lost; > 0 hurts), the mean of n samples."""
    L = len(cost)
    tail = L - max(2, L // 4)
    lo = L // 2 if L // 2 < tail else 1
    if tail <= lo:  # too shallow for a middle and a tail
        return {"tail_start": tail, "trough_layer": 0, "peak_layer": L - 1, "rise": float("nan"), "review": False,
                "reason": f"{L} layers: too few for a middle and a tail"}  # fmt: skip
    trough = lo + int(np.argmin(cost[lo:tail]))
    peak = tail + int(np.argmax(cost[tail:]))
    # a negative trough (blocking helped: noise at this sample size) must not make a small tail cost look like a rise
    rise = float(cost[peak] - max(cost[trough], 0.0))
    review = bool(rise > tol and rise > 2 * sem[peak] and n >= 3)
    verdict = "late review" if review else "no late review" + (f" ({n} samples: too few)" if n < 3 else "")
    clipped = ", counted as 0" if cost[trough] < 0 else ""
    reason = (f"{verdict}: blocking layer {peak} alone costs {cost[peak]:.3f} nats, {rise:+.3f} over the middle's "
              f"trough (layer {trough}: {cost[trough]:.3f}{clipped}; needs > {tol:g} and > 2 x sem {sem[peak]:.3f})")  # fmt: skip
    return {"tail_start": tail, "trough_layer": trough, "peak_layer": peak, "rise": rise, "review": review,
            "reason": reason}  # fmt: skip


def late_reviews(ll: np.ndarray, families: list[str], tol: float) -> dict[str, LateReview]:
    """Per family (and "all"): the cost curve of blocking one layer at a time, and its late-review flag."""
    M = ll.shape[0]
    L = (ll.shape[1] - 1) // 2
    cost_all = -(ll[:, 1 : 1 + L] - ll[:, :1])  # (M, L): > 0 where blocking hurts
    groups = {"all": list(range(M))}
    for i, fam in enumerate(families[:M]):
        if fam != "all":
            groups.setdefault(fam, []).append(i)
    out = {}
    for fam in sorted(groups, key=lambda f: (f == "all", f)):
        c = cost_all[groups[fam]]
        mean, sem = c.mean(0), (c.std(0, ddof=1) / np.sqrt(len(c)) if len(c) > 1 else np.zeros(L))
        out[fam] = LateReview(family=fam, n_samples=len(c), cost=mean.tolist(), cost_sem=sem.tolist(),
                              **late_review(mean, sem, tol, len(c)))  # fmt: skip
    return out
