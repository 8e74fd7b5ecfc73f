"""How `dpvr reproduce` trains every row and `dpvr demo` its side branch: at least one epoch of
train.json at batch 16, the held-out (val) loss scored `points` times along the budget, then on until
the held-out plateau (`dpvr.train.plateau`) or the cap, whichever comes first. DPVR rows read the
frozen shared stack's output from a cache (`dpvr.train.shared_cache`), filled once per split. What
the reproduction measured with it is in docs/train.md."""
from __future__ import annotations

import math

BATCH = 16
HELD_OUT_POINTS = 12  # held-out evaluations over the budget: a plateau can show from the 4th on
HELD_OUT_LIMIT = 256  # val samples in the held-out loss
MIN_EPOCHS = 1  # no run stops at its plateau before this many epochs (the paper trains one) ...
MAX_EPOCHS = 2  # ... and one still falling goes on up to this many
CACHE_FOLDER = "shared-stack"  # under a pipeline's output folder: the DPVR runs' shared-stack cache
# training autocasts to bf16 (fp32 weights and optimizer; evaluation stays fp32): faster at the same losses,
# measured in docs/train.md, "Mixed precision"
BF16 = True
# training batches of similar lengths (dpvr.train.sampling): a full-model step 10% faster here, docs/train.md
GROUPED = True


def release_cache(out, keep: bool = False) -> str | None:
    """Remove OUT's shared-stack cache once nothing will read it (tens of GB for the reproduction: the
    states of every sample after every split it trained at), unless `keep`; what was done, said in a line."""
    import shutil
    from pathlib import Path

    folder = Path(out) / CACHE_FOLDER
    if not folder.is_dir():
        return None
    gb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**30
    if keep:
        return f"the shared-stack cache {folder} ({gb:.1f} GiB) is kept (--keep-cache)"
    shutil.rmtree(folder)
    return f"removed the shared-stack cache {folder} ({gb:.1f} GiB; --keep-cache keeps it for later runs)"


def epoch_steps(batch: int = BATCH, seed: int = 0, limit: int | None = None) -> int:
    """Steps in one pass over the digit-scenes benchmark's train.json (its first `limit` samples)."""
    from dpvr.data.digit_scenes import open_benchmark
    from dpvr.data.llava_json import load_samples

    return math.ceil(len(load_samples(open_benchmark(None, seed) / "train.json")[:limit]) / batch)


def budget(epoch: int, min_epochs: float = MIN_EPOCHS, max_epochs: float = MAX_EPOCHS) -> tuple[int, int]:
    """(the cap, the steps before which no run stops) of the recipe, in steps of an `epoch`-step epoch."""
    return math.ceil(epoch * max(max_epochs, min_epochs)), math.ceil(epoch * min_epochs)


def eval_every(steps: int, points: int, min_steps: int = 0) -> int:
    """Steps between held-out evaluations: `points` over the budget `steps`, spaced so that one lands
    at (or just past) `min_steps`, where the plateau stop can first end the run; an evaluation due
    after it would run the whole gap for nothing. A run that cannot stop early splits its budget evenly."""
    if not 0 < min_steps < steps:
        return max(1, steps // points)
    return math.ceil(min_steps / max(1, round(points * min_steps / steps)))


def training_flags(steps: int, batch: int = BATCH, points: int = HELD_OUT_POINTS, held_out: int = HELD_OUT_LIMIT,
                   until_plateau: bool = True, min_steps: int = 0, cache: str | None = None, bf16: bool = BF16,
                   limit: int | None = None) -> list[str]:  # fmt: skip
    """`dpvr train` flags after `--max_steps` (the cap)/`--learning_rate`: batch, precision, batch order, logging, the
    held-out curve (from the untrained side branch on, when `until_plateau`), the stop (not before
    `min_steps`), for a DPVR run the shared-stack cache folder, and `limit`: train on the first samples only."""
    from dpvr.train.sampling import GROUP_BY_LENGTH

    every = eval_every(steps, points, min_steps)
    bf16 = bf16 and _bf16_trains_here()
    return ["--per_device_train_batch_size", str(batch), "--bf16", str(bf16).lower(), "--save_steps", str(10**9), "--logging_steps",
            str(max(1, every // 2)), "--eval_strategy", "steps", "--eval_steps", str(every), "--eval_limit", str(held_out),
            "--disable_tqdm", "true", "--train_sampling_strategy", GROUP_BY_LENGTH if GROUPED else "random",
            *(["--eval_on_start", "true", "--stop_at_plateau", "true"] if until_plateau else []),
            *(["--plateau_min_steps", str(min_steps)] if until_plateau and min_steps else []),
            *(["--shared_stack_cache", cache] if cache else []), *(["--limit", str(limit)] if limit else [])]  # fmt: skip


def _bf16_trains_here() -> bool:
    """The Trainer refuses bf16 on a GPU without it (before Ampere); CPU autocast runs it anywhere."""
    import torch

    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
