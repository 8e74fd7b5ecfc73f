"""What a training step of the embedded default costs on this CPU, by attention implementation and
threads: the full model's forward and backward under bf16 autocast at batch 16 on real train.json
batches (random ones, and ones of near-equal lengths), after a warm-up step, medians over rounds.

    python3 benchmarks/cpu_step_speed.py --threads 2                  # one run with both cores
    python3 benchmarks/cpu_step_speed.py --threads 1 & python3 benchmarks/cpu_step_speed.py --threads 1
                                                                    # two one-thread runs side by side

Seconds per step for `sdpa` (CPU autocast runs it in bf16) and `dpvr_sdpa_fp32` (dpvr.attention); the
side-by-side throughput is 2 / (seconds per step of each), against 1 / (the two-thread seconds).
Figures measured with it are in docs/train.md ("Runs side by side").
"""
import argparse
import json
import statistics
import time

import numpy as np
import torch
from _common import add_data_options, train_samples
from transformers import LlavaForConditionalGeneration

from dpvr.attention import FP32_SDPA
from dpvr.data.collate import Collator
from dpvr.data.llava_json import LlavaJsonDataset
from dpvr.loading import resolve_model_path


def batches(args, n_batches: int) -> dict[str, list[dict]]:
    """{"random": batches of random samples, "grouped": batches of neighbours in length order}, of --batch
    samples each, from the samples `_common.add_data_options`' options pick."""
    root, processor, samples = train_samples(args)
    data = LlavaJsonDataset(samples, root / "images", processor)
    batch = args.batch
    collate = Collator(processor.tokenizer.pad_token_id, keep_ids=False)
    items = [data.encode(i) for i in range(len(data))]
    lengths = np.array([len(it["input_ids"]) for it in items])
    rng = np.random.default_rng(0)
    by_length = np.argsort(lengths + rng.random(len(lengths)))
    picks = {"random": [rng.choice(len(items), batch, replace=False) for _ in range(n_batches)],
             "grouped": [by_length[i * batch:(i + 1) * batch] for i in rng.choice(len(items) // batch, n_batches, replace=False)]}  # fmt: skip
    return {k: [collate([items[i] for i in ix]) for ix in v] for k, v in picks.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=11, help="timed steps per round and setting (after one warm-up)")
    p.add_argument("--out", default=None, help="also write the medians here as JSON")
    add_data_options(p, samples=1600, batch=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = batches(args, args.steps + 1)
    model = LlavaForConditionalGeneration.from_pretrained(resolve_model_path(args.model)).train()

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}, use_cache=False).loss
        loss.backward()
        model.zero_grad()

    seconds: dict[str, list[float]] = {}
    for _ in range(args.rounds):  # settings interleaved within each round
        for attn in ("sdpa", FP32_SDPA):
            model.set_attn_implementation(attn)
            for kind, bs in data.items():
                step(bs[0])
                start = time.perf_counter()
                for b in bs[1:]:
                    step(b)
                seconds.setdefault(f"{attn} {kind}", []).append((time.perf_counter() - start) / (len(bs) - 1))
    medians = {k: round(statistics.median(v), 3) for k, v in seconds.items()}
    print(json.dumps({"threads": args.threads, "seconds_per_step": medians}, indent=1))
    if args.out:
        from dpvr.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps({"threads": args.threads, "seconds_per_step": medians, "all": seconds}) + "\n")


if __name__ == "__main__":
    main()
