"""What the measurement scripts that read train.json share: the options that pick the benchmark, the checkpoint
and the samples, and the samples they pick."""
from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoProcessor

from dpvr.data.digit_scenes import open_benchmark
from dpvr.data.llava_json import load_samples
from dpvr.loading import resolve_model_path


def add_data_options(p: argparse.ArgumentParser, samples: int | None = None, batch: bool = False) -> None:
    """--samples (default `samples`, None: all), --batch (with `batch`), --data and --model."""
    p.add_argument("--samples", type=int, default=samples, help=f"the first N train.json samples only (default: {samples or 'all'})")
    if batch:
        p.add_argument("--batch", type=int, default=16)
    p.add_argument("--data", default=None, help="digit-scenes benchmark dir (default: the seed-0 one, built if missing)")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")


def train_samples(args: argparse.Namespace) -> tuple[Path, object, list[dict]]:
    """(the benchmark's folder, the checkpoint's processor, the first --samples samples of its train.json)."""
    root = open_benchmark(args.data, 0)
    processor = AutoProcessor.from_pretrained(resolve_model_path(args.model))
    return root, processor, load_samples(root / "train.json")[: args.samples]
