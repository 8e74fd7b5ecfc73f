"""`dpvr eval`: score a model on the digit-scenes benchmark with the paper's metrics.

    dpvr eval                                              # the embedded tiny LLaVA, vanilla
    dpvr eval --mode fastv --fastv-layer 2 --fastv-ratio 0.5
    dpvr eval --mode vtw --split-layer 9
    dpvr eval --model BASE --adapter runs/train/lf/final   # a trained side branch on its base
    dpvr eval --from runs/demo                             # the routing the demo's analysis recommends (dpvr.recommended)
    dpvr eval --contrast-strength 1 --contrast-early 9     # with contrastive attention (docs/contrastive.md)
    dpvr eval --model runs/lf/final --fusion-policy policy.json   # fusion placed per family (docs/fusion_policy.md)

Writes OUT/eval.json (every metric, per POPE subset too, and every reply) and prints a table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dpvr.atomic import atomic_write_text
from dpvr.cli_types import at_least
from dpvr.contrast_flags import add_contrast_arguments, contrast_config
from dpvr.errors import UsageError
from dpvr.eval.metrics import FAMILIES
from dpvr.fusion_policy import add_policy_arguments, load_policy
from dpvr.model_flags import add_model_arguments, model_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="benchmark folder (default: the digit-scenes cache for --seed)")
    p.add_argument("--seed", type=int, default=0, help="benchmark seed (when --data is not given)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated question families")
    p.add_argument("--limit-per-family", type=at_least(1), default=None, help="score only the first N of each family")
    p.add_argument("--batch-size", type=at_least(1), default=32)
    p.add_argument("--out", default="runs/eval", help="output folder")
    add_model_arguments(p)
    add_contrast_arguments(p)
    add_policy_arguments(p)


def run(args: argparse.Namespace) -> int:
    from dpvr.data.digit_scenes import open_benchmark
    from dpvr.eval.runner import evaluate, format_table
    from dpvr.loading import describe, load_model

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not families:
        raise UsageError(f"--families {args.families!r} names no family; choose from {','.join(FAMILIES)}")
    data = open_benchmark(args.data, args.seed)
    policy = load_policy(args.fusion_policy)
    model, processor = load_model(**model_kwargs(args))
    contrast = contrast_config(args, model.config.text_config.num_hidden_layers)
    if policy is not None:
        policy.check_model(model)
    result = evaluate(model, processor, data, args.split, args.batch_size, families, args.limit_per_family,
                      contrast=contrast, policy=policy)  # fmt: skip
    out = Path(args.out)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1) + "\n")
    name = describe(model) + ("" if contrast is None else f" +contrast {contrast.strength:g}")
    name += "" if policy is None else " +fusion policy"
    print(format_table({name: result}))
    print(f"{result['n']} questions in {result['seconds']:.1f} s; wrote {out / 'eval.json'}")
    return 0
