"""How much of a difference in mean score is noise: a paired bootstrap over the evaluated questions.

Every method answered the same questions; a resample draws questions with replacement (an MME image pair
or an MMBench rotation group as one unit, as their metrics score them), scores every method on the same
draw, and the spread of (method's mean - vanilla's mean) over the draws is its standard error.
"""
from __future__ import annotations

import random
import statistics

from dpvr.eval.metrics import score_all

ROUNDS = 400


def unit_of(sample: dict) -> str:
    meta = sample["meta"]
    return str(meta.get("pair_id", meta.get("circ_group", sample["id"])))


def paired_se(samples: list[dict], replies: dict[str, dict[str, str]], reference: str, rounds: int = ROUNDS,
              seed: int = 0) -> dict[str, float]:  # fmt: skip
    """{method: bootstrap SE of its mean minus `reference`'s}; `replies`: {method: {sample id: reply}}, all
    on `samples`."""
    units: dict[str, list[dict]] = {}
    for s in samples:
        units.setdefault(unit_of(s), []).append(s)
    keys, rng = sorted(units), random.Random(seed)
    diffs: dict[str, list[float]] = {m: [] for m in replies}
    for _ in range(rounds):
        draw = [_copy(s, k) for k, u in enumerate(rng.choice(keys) for _ in keys) for s in units[u]]
        means = {m: score_all(draw, [r[s["id"].split("#")[0]] for s in draw])["mean"] for m, r in replies.items()}
        for m in replies:
            diffs[m].append(means[m] - means[reference])
    return {m: statistics.stdev(d) if len(d) > 1 else 0.0 for m, d in diffs.items()}


def _copy(sample: dict, k: int) -> dict:
    """The sample as drawn the k-th time: its pair / rotation group renamed so that two draws of one unit
    score as two units."""
    meta = dict(sample["meta"])
    for key in ("pair_id", "circ_group"):
        if key in meta:
            meta[key] = f"{meta[key]}#{k}"
    return {**sample, "id": f"{sample['id']}#{k}", "meta": meta}
