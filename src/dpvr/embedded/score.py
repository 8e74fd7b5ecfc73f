"""Greedy-decoding scorer for digit scenes: exact-match accuracy per question family.

    python -m dpvr.embedded.score                       # the shipped tiny LLaVA on the test split
    python -m dpvr.embedded.score --model DIR --split val --limit 300 --out scores.json

An answer is right when the decoded reply (special tokens dropped, whitespace-stripped) equals the
reference answer. Besides per-question accuracy it reports MME's accuracy+ (both questions of a pair
right) and MMBench's circular accuracy (all 4 rotations right). The paper's full metrics (POPE F1 and
yes-ratio per subset, ...) are `dpvr eval`'s job; this is the quick check used while training.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from dpvr.atomic import atomic_write_text
from dpvr.data.templates import render_prompt

CHANCE = {"pope": 0.5, "mme": 0.5, "mmbench": 0.25, "count": 0.1, "spatial": 1 / 11, "reasoning": 0.27, "text": 0.27}


@torch.no_grad()
def predict(model, processor, samples: list[dict], images_dir, template: str = "chat", batch_size: int = 32,
            max_new_tokens: int = 4, progress: bool = False) -> list[str]:  # fmt: skip
    """Greedy replies to the first human turn of each sample, in order."""
    images_dir = Path(images_dir)
    replies: dict[int, str] = {}
    groups = [[i for i, s in enumerate(samples) if ("image" in s) == flag] for flag in (True, False)]
    batches = [g[k : k + batch_size] for g in groups for k in range(0, len(g), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch")
    device = next(model.parameters()).device
    for idx in batches:
        has_image = "image" in samples[idx[0]]
        prompts = [render_prompt(processor, samples[i]["conversations"][0]["value"], template, has_image) for i in idx]
        kw = dict(padding=True, padding_side="left", return_tensors="pt")
        if has_image:
            images = [Image.open(images_dir / samples[i]["image"]).convert("RGB") for i in idx]
            enc = processor(text=prompts, images=images, **kw)
        else:
            enc = processor.tokenizer(prompts, **kw)
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)  # (B, T + new)
        new = out[:, enc["input_ids"].shape[1] :]
        for i, row in zip(idx, new):
            replies[i] = processor.tokenizer.decode(row, skip_special_tokens=True).strip()
    return [replies[i] for i in range(len(samples))]


def score(model, processor, samples: list[dict], images_dir, template: str = "chat", batch_size: int = 32,
          progress: bool = False) -> dict:  # fmt: skip
    """{"families": {family: {"n", "accuracy", ...}}, "replies": [...]} for single-question samples."""
    replies = predict(model, processor, samples, images_dir, template, batch_size, progress=progress)
    right = defaultdict(list)
    pairs, circ = defaultdict(list), defaultdict(list)
    for s, reply in zip(samples, replies):
        meta = s["meta"]
        ok = reply == meta["answer"]
        right[meta["family"]].append(ok)
        if "pair_id" in meta:
            pairs[meta["pair_id"]].append(ok)
        if meta["family"] == "mmbench" and "circ_group" in meta:
            circ[meta["circ_group"]].append(ok)
    fams = {f: {"n": len(v), "accuracy": sum(v) / len(v), "chance": CHANCE.get(f)} for f, v in sorted(right.items())}
    if pairs:
        fams["mme"]["accuracy_plus"] = sum(all(v) for v in pairs.values()) / len(pairs)
    if circ:
        fams["mmbench"]["circular_accuracy"] = sum(all(v) for v in circ.values()) / len(circ)
    return {"families": fams, "replies": replies}


def format_table(families: dict) -> str:
    lines = ["| family | n | accuracy | chance | extra |", "| --- | --- | --- | --- | --- |"]
    for f, r in families.items():
        extra = ", ".join(f"{k} {r[k]:.3f}" for k in ("accuracy_plus", "circular_accuracy") if k in r)
        lines.append(f"| {f} | {r['n']} | {r['accuracy']:.3f} | {r['chance']:.2f} | {extra} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from dpvr.data.digit_scenes import load_split, open_benchmark
    from dpvr.embedded import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--data", default=None, help="benchmark dir (default: the cache for --seed)")
    ap.add_argument("--seed", type=int, default=0, help="benchmark seed")
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    ap.add_argument("--template", default="chat", choices=["chat", "vicuna_v1"])
    ap.add_argument("--out", default=None, help="write the scores as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = open_benchmark(args.data, args.seed)
    samples = load_split(root, args.split)[: args.limit]
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    result = score(model, processor, samples, root / "images", args.template, progress=True)
    print(format_table(result["families"]))
    if args.out:
        atomic_write_text(args.out, json.dumps({"model": str(args.model), "split": args.split,
                                                "families": result["families"]}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
