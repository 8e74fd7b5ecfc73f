"""Why the demo's training loss sits above its held-out loss: one model's loss on both sets, no training.

    PYTHONPATH=src python scripts/heldout_gap.py [ADAPTER]     # default: the stock embedded tiny LLaVA

Prints the loss (mean over batches of 16, as the Trainer's) on the first 256 samples of train.json (the
training curve's data: multi-turn conversations) and of val.json (the held-out curve's: one question
each), the held-out loss per question family, and train.json cut to each conversation's first question.
"""
import collections
import sys

import torch

from dpvr.data.collate import Collator
from dpvr.data.digit_scenes import open_benchmark
from dpvr.data.llava_json import LlavaJsonDataset, load_samples
from dpvr.loading import load_model

N = 256  # the demo's --held-out


def main() -> None:
    model, processor = load_model(adapter=sys.argv[1] if len(sys.argv) > 1 else None)
    root = open_benchmark(None, 0)
    collate = Collator(pad_token_id=processor.tokenizer.pad_token_id, padding_side="right", keep_ids=False)

    def loss(samples: list[dict]) -> float:
        data = LlavaJsonDataset(samples, root / "images", processor, skip_markers=True)
        with torch.no_grad():
            losses = [model(**collate([data[j] for j in range(i, min(i + 16, len(data)))])).loss.item()
                      for i in range(0, len(data), 16)]  # fmt: skip
        return sum(losses) / len(losses)

    train, val = load_samples(root / "train.json")[:N], load_samples(root / "val.json")[:N]
    print(f"train.json[:{N}] {loss(train):.3f}   val.json[:{N}] {loss(val):.3f}")
    families = collections.defaultdict(list)
    for s in val:
        families[s["meta"]["family"]].append(s)
    print("val.json by family:", {f: f"{loss(v):.3f} ({len(v)})" for f, v in families.items()})
    print(f"train.json[:{N}], first question only: {loss([dict(s, conversations=s['conversations'][:2]) for s in train]):.3f}")


if __name__ == "__main__":
    main()
