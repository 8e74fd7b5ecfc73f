"""Run a model over the digit-scenes benchmark and score it: `evaluate(model, processor, data_dir)`.

Batched greedy generation with left padding (image and text-only questions in separate batches),
deterministic: the same model gives the same replies and scores run to run. Errors propagate; a
failed batch is never turned into empty answers.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch

from dpvr.analysis.attention_truth import family_of
from dpvr.data.digit_scenes import load_split
from dpvr.errors import DPVRError
from dpvr.embedded.score import predict
from dpvr.eval.metrics import FAMILIES, score_all
from dpvr.fusion_policy import Request, by_placement
from dpvr.loading import describe


def select(samples: list[dict], families: list[str] | None, limit_per_family: int | None) -> list[dict]:
    """Keep the requested families, the first `limit_per_family` questions of each (whole MME pairs and
    MMBench rotation groups stay together because the benchmark writes them consecutively)."""
    wanted = set(families or FAMILIES)
    unknown = wanted - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; choose from {FAMILIES}")
    count: dict[str, int] = defaultdict(int)
    keep = []
    for s in samples:
        f = s["meta"]["family"]
        if f in wanted and (limit_per_family is None or count[f] < limit_per_family):
            keep.append(s)
            count[f] += 1
    return keep


@torch.inference_mode()
def evaluate(
    model,
    processor,
    data_dir: str | Path,
    split: str = "test",
    batch_size: int = 32,
    families: list[str] | None = None,
    limit_per_family: int | None = None,
    progress: bool = True,
    contrast=None,
    policy=None,
) -> dict:
    """{'model': ..., 'split': ..., 'n': ..., 'seconds': ..., 'scores': {family: {...}, 'mean': x}, 'replies': {id: reply},
    'contrast': the ContrastConfig's fields or None, 'fusion_policy': ..., 'placements': {id: fusion_at}}.
    contrast: a `dpvr.contrast.ContrastConfig` to answer under; policy: a `dpvr.fusion_policy.FusionPolicy`
    picking each question's fusion placement from its family (the task) and its input."""
    from dataclasses import asdict

    from dpvr.contrast import contrast as contrastive

    data_dir = Path(data_dir)
    samples = select(load_split(data_dir, split), families, limit_per_family)
    if not samples:  # a mean over zero questions would read as a score of 0
        raise DPVRError(f"no {split} question selected in {data_dir} (families {families}, limit {limit_per_family})")
    start = time.perf_counter()
    placements = None if policy is None else [policy.pick(request_of(processor, s)) for s in samples]
    with contrastive(model, contrast):
        if placements is None:
            replies = predict(model, processor, samples, data_dir / "images", batch_size=batch_size, progress=progress)
        else:
            replies = by_placement(model, placements, lambda idx: predict(
                model, processor, [samples[i] for i in idx], data_dir / "images", batch_size=batch_size, progress=progress))
    return {
        "model": describe(model),
        "contrast": None if contrast is None else asdict(contrast),
        "split": split,
        "n": len(samples),
        "seconds": time.perf_counter() - start,
        "scores": score_all(samples, replies),
        "replies": {s["id"]: r for s, r in zip(samples, replies)},
        "fusion_policy": None if policy is None else policy.to_dict(),
        "placements": None if placements is None else {s["id"]: list(p) for s, p in zip(samples, placements)},
    }


def request_of(processor, sample: dict) -> Request:
    """What a fusion policy knows of a benchmark question: its family (MME by category, as `dpvr analyze`
    groups them), image count and prompt length."""
    question = sample["conversations"][0]["value"]
    return Request(task=family_of(sample["meta"]), n_images=int("image" in sample),
                   prompt_tokens=len(processor.tokenizer(question).input_ids))  # fmt: skip


def format_table(results: dict[str, dict]) -> str:
    """Rows: models; columns: the headline metric of each family, plus the mean."""
    from dpvr.eval.metrics import headline

    fams = [f for f in FAMILIES if any(f in r["scores"] for r in results.values())]
    head = f"{'model':<24}" + "".join(f"{f:>10}" for f in fams) + f"{'mean':>8}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        s = r["scores"]
        lines.append(f"{name:<24}" + "".join(f"{headline(f, s[f]):>10.3f}" if f in s else f"{'-':>10}" for f in fams)
                     + f"{s['mean']:>8.3f}")  # fmt: skip
    lines.append("pope: F1 (yes positive); mme: accuracy+; mmbench: circular accuracy; others: accuracy")
    return "\n".join(lines)
