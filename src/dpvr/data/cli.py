"""`dpvr data`: write the digit-scenes benchmark (LLaVA-665k JSON + PNG images) and print its summary.

    dpvr data --out /tmp/digit-scenes --seed 0
    dpvr data                      # into the cache dir (~/.cache/dpvr/digit-scenes-v2-seed0, or $DPVR_CACHE)
"""
from __future__ import annotations

import argparse
import json
from collections import Counter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="output dir (default: the cache dir for --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seeds scan pools, scenes and questions")


def run(args: argparse.Namespace) -> int:
    from dpvr.data.digit_scenes import ensure_benchmark, load_split  # numpy and PIL: not for --help

    root = ensure_benchmark(args.out, args.seed)
    manifest = json.loads((root / "MANIFEST.json").read_text())
    print(f"{root}: {manifest['version']} seed {manifest['seed']}, samples {manifest['samples']}")
    for split in ("val", "test"):
        fams = Counter(s["meta"]["family"] for s in load_split(root, split))
        print(f"  {split}: " + ", ".join(f"{f} {n}" for f, n in sorted(fams.items())))
    return 0
