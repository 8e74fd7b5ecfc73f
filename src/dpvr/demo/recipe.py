"""How `dpvr reproduce` trains every row and `dpvr demo` its side branch: a budget of steps (one epoch of
train.json at batch 16 in the reproduction), the held-out (val) loss scored `points` times along it, and
the run ends at its plateau (`dpvr.train.plateau`) when that comes first. What the reproduction measured
with it is in docs/train.md."""
from __future__ import annotations

import math

BATCH = 16
HELD_OUT_POINTS = 12  # held-out evaluations over the budget: a plateau can show from the 4th on
HELD_OUT_LIMIT = 256  # val samples in the held-out loss


def epoch_steps(batch: int = BATCH, seed: int = 0) -> int:
    """Steps in one pass over the digit-scenes benchmark's train.json."""
    from dpvr.data.digit_scenes import open_benchmark
    from dpvr.data.llava_json import load_samples

    return math.ceil(len(load_samples(open_benchmark(None, seed) / "train.json")) / batch)


def training_flags(steps: int, batch: int = BATCH, points: int = HELD_OUT_POINTS, held_out: int = HELD_OUT_LIMIT,
                   until_plateau: bool = True) -> list[str]:  # fmt: skip
    """`dpvr train` flags after `--max_steps`/`--learning_rate`: batch, logging, the held-out curve (from the
    untrained side branch on, when `until_plateau`) and the stop."""
    every = max(1, steps // points)
    return ["--per_device_train_batch_size", str(batch), "--save_steps", str(10**9), "--logging_steps",
            str(max(1, every // 2)), "--eval_strategy", "steps", "--eval_steps", str(every), "--eval_limit", str(held_out),
            "--disable_tqdm", "true",
            *(["--eval_on_start", "true", "--stop_at_plateau", "true"] if until_plateau else [])]  # fmt: skip
