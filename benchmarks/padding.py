"""How much padding random training batches carry on the embedded default, against length-grouped ones
(`dpvr.train.sampling`): every train.json sample encoded, batches of 16 from one epoch of each order.

    python3 benchmarks/padding.py            # prints JSON: token and attention work relative to no padding

"linear" is sum over batches of B x (longest sample), over the sum of sample lengths: what the linear
layers run over. "attention" is the same with lengths squared. Figures are in docs/train.md
("Length-grouped batches").
"""
import argparse
import json
import statistics

import torch
from _common import add_data_options, train_samples

from dpvr.data.llava_json import LlavaJsonDataset
from dpvr.train.sampling import LengthGroupedSampler

BATCH = 16


def work(order: list[int], tokens: list[int], power: int) -> float:
    batches = [order[k : k + BATCH] for k in range(0, len(order), BATCH)]
    padded = sum(len(b) * max(tokens[i] for i in b) ** power for b in batches)
    return padded / sum(t**power for t in tokens)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_options(p)
    root, processor, samples = train_samples(p.parse_args(argv))
    data = LlavaJsonDataset(samples, root / "images", processor)
    tokens = [len(data.encode(i)["input_ids"]) for i in range(len(data))]
    orders = {"random": torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist(),
              "grouped": list(LengthGroupedSampler(data.lengths, BATCH, seed=0))}  # fmt: skip
    print(json.dumps({
        "samples": len(tokens), "tokens": {"min": min(tokens), "mean": statistics.mean(tokens), "max": max(tokens)},
        "estimate_vs_tokens_correlation": statistics.correlation(data.lengths, tokens),
        **{name: {"linear": work(o, tokens, 1), "attention": work(o, tokens, 2)} for name, o in orders.items()},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
