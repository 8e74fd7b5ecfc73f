"""Length-grouped training batches: `dpvr train --train_sampling_strategy group_by_length`.

Random batches pad every sample to the longest in its batch; on digit scenes (3% text-only samples of
21 tokens, image samples of 230-295) that wasted 9% of the linear layers' work and 16% of attention
(docs/train.md, "Length-grouped batches"). LLaVA-1.5 fine-tunes with its modality-length grouping for
the same reason. HF's own sampler for this strategy reads a `length` column of a `datasets.Dataset` or
encodes every sample to measure it (every image opened); here the dataset's `lengths` (a cheap estimate
from the text, see `LlavaJsonDataset.lengths`) are used instead, and the order is a function of
(seed, epoch) alone, so a run resumed in any epoch replays the batches of the uninterrupted one.
"""
from __future__ import annotations

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

GROUP_BY_LENGTH = "group_by_length"  # HF's TrainingArguments.train_sampling_strategy value


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices in batches of similar length: a random permutation cut into mega-batches of 50 batches,
    each sorted by length (HF's `get_length_grouped_indices`), the permutation drawn from seed + epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls this before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
