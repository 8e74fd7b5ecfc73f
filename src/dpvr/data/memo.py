"""Encoded samples kept in memory for the rest of the process, across dataset instances.

Encoding a LLaVA JSON sample (chat template, tokenizer, image decode and preprocessing) is the same
work every time the sample is read: in every epoch, and in every run of a process that trains several
(`dpvr reproduce` trains about twenty full-model runs on the same train.json in one process, and
spent 7-9% of each run encoding: docs/train.md, "Encoded samples"). A dataset keeps what it
encoded here under a key of everything the encoding depends on, so a second run (or epoch) on the
same samples (wherever they sit in the file) with the same processor, template and length reads it
back. Only `BUDGET` bytes are kept per process (a DataLoader worker has its own): a large data set
keeps its first samples and encodes the rest as before. Samples that failed are not kept; they fail
again, and count once."""
from __future__ import annotations

import hashlib
import json
from typing import Callable

import torch

BUDGET = 512 * 2**20  # bytes of tensors kept per process (the digit scenes' train.json takes 194 MiB)


def memo_key(images_dir, processor, template: str, max_length: int | None) -> str:
    """What an encoded sample depends on besides the sample itself: where its image is, the processor
    (its repr lists the tokenizer's name, vocabulary and special tokens and the image processor's
    settings), the template and the truncation."""
    what = {"images": str(images_dir), "processor": repr(processor), "template": template, "max_length": max_length}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


class EncodedMemo:
    def __init__(self, budget: int = BUDGET):
        self.budget, self.used, self._items = budget, 0, {}

    def read(self, key: str, sample, encode: Callable[[], dict]) -> dict:
        """The item kept for `sample` under `key`, else `encode()` (kept if it fits; an exception from it
        propagates and nothing is kept). A copy either way: callers pop from their item."""
        at = (key, json.dumps(sample, sort_keys=True, default=str))
        if (item := self._items.get(at)) is None:
            item = encode()
            size = sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))
            if self.used + size <= self.budget:
                self._items[at], self.used = item, self.used + size
        return dict(item)


MEMO = EncodedMemo()
