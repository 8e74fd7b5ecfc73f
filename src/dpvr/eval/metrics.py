"""The paper's metrics, each the one its benchmark uses, as pure functions of (samples, replies).

    pope      accuracy, precision, recall, F1 (yes = positive) and yes-ratio, per negative type
    mme       accuracy per question and accuracy+ per image (both of its two questions right);
              MME's score = 100 * (accuracy + accuracy+)
    mmbench   circular accuracy: a question counts only if every rotation of its options is right
    count, spatial, reasoning, text   exact-match accuracy of the normalised answer

Replies are normalised per family first (`normalise`), so "Yes." and "yes" agree and an MMBench
reply "B. 6" counts as "B".
"""
from __future__ import annotations

import re
from collections import defaultdict

FAMILIES = ("pope", "mme", "mmbench", "count", "spatial", "reasoning", "text")


def normalise(family: str, reply: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", reply)
    first = words[0] if words else ""
    if family in ("pope", "mme"):
        return first.lower() if first.lower() in ("yes", "no") else "other"
    if family == "mmbench":
        return first.upper() if first.upper() in ("A", "B", "C", "D") else "other"
    return first.lower()


def binary_scores(truth: list[str], pred: list[str]) -> dict[str, float]:
    """yes/no metrics with 'yes' as the positive class (POPE's convention)."""
    tp = sum(t == "yes" and p == "yes" for t, p in zip(truth, pred))
    fp = sum(t == "no" and p == "yes" for t, p in zip(truth, pred))
    fn = sum(t == "yes" and p != "yes" for t, p in zip(truth, pred))
    n = len(truth)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": n,
        "accuracy": sum(t == p for t, p in zip(truth, pred)) / n,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(p == "yes" for p in pred) / n,
    }


def score_family(family: str, samples: list[dict], replies: list[str]) -> dict:
    truth = [s["meta"]["answer"] for s in samples]
    pred = [normalise(family, r) for r in replies]
    right = [t.lower() == p.lower() for t, p in zip(truth, pred)]
    out: dict = {"n": len(samples), "accuracy": sum(right) / len(right)}
    if family == "pope":
        by_subset = defaultdict(list)
        for i, s in enumerate(samples):
            by_subset[s["meta"]["subset"]].append(i)
        out["subsets"] = {k: binary_scores([truth[i] for i in v], [pred[i] for i in v]) for k, v in sorted(by_subset.items())}
        out.update({k: v for k, v in binary_scores(truth, pred).items() if k != "n"})
    elif family == "mme":
        pairs = defaultdict(list)
        for s, ok in zip(samples, right):
            pairs[s["meta"]["pair_id"]].append(ok)
        out["accuracy_plus"] = sum(all(v) for v in pairs.values()) / len(pairs)
        out["score"] = 100 * (out["accuracy"] + out["accuracy_plus"])
    elif family == "mmbench":
        groups = defaultdict(list)
        for s, ok in zip(samples, right):
            groups[s["meta"]["circ_group"]].append(ok)
        out["circular_accuracy"] = sum(all(v) for v in groups.values()) / len(groups)
    return out


HEADLINE = {"pope": "f1", "mme": "accuracy_plus", "mmbench": "circular_accuracy"}


def headline(family: str, scores: dict) -> float:
    """The one number per family that tables report (POPE F1, MME acc+, MMBench circular, else accuracy)."""
    return scores[HEADLINE.get(family, "accuracy")]


def score_all(samples: list[dict], replies: list[str]) -> dict:
    """{family: scores} plus 'mean' = mean headline over the image families present."""
    by_family = defaultdict(list)
    for i, s in enumerate(samples):
        by_family[s["meta"]["family"]].append(i)
    unknown = sorted(set(by_family) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown question families {unknown} (sample {samples[by_family[unknown[0]][0]]['id']})")
    result = {f: score_family(f, [samples[i] for i in idx], [replies[i] for i in idx])
              for f in FAMILIES if (idx := by_family.get(f))}  # fmt: skip
    image_families = [f for f in result if f != "text"]
    result["mean"] = sum(headline(f, result[f]) for f in image_families) / max(len(image_families), 1)
    return result
