"""Batch LLaVA samples: pad to the longest, labels padded with -100, images stacked for those that have one.

    collate = Collator(pad_token_id=processor.tokenizer.pad_token_id, padding_side="right")  # training
    collate = Collator(pad_token_id=..., padding_side="left")                               # generation
    batch = collate([ds[i] for i in range(8)])   # None items (samples skipped by the dataset) are dropped

A batch mixing text-only and image samples works because LLaVA scatters the image features, in order,
onto the `<image>` tokens of the whole batch: `pixel_values` holds only the images that exist. A batch
with no image at all has no `pixel_values`, so the vision tower does not run; under DDP that leaves its
parameters without gradient on that rank. LLaVA's own code runs the tower on an empty slice for that
reason; with HF, use `ddp_find_unused_parameters=True` (or batches that always hold an image).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dpvr.errors import DPVRError

IGNORE = -100


@dataclass
class Collator:
    pad_token_id: int
    padding_side: str = "right"  # "right" for training, "left" for batched generation
    keep_ids: bool = True  # pass sample ids through (drop them before a model call that rejects extra keys)

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise DPVRError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def __call__(self, items: list[dict | None]) -> dict:
        skips = [(it["skipped"], it["id"], it["index"]) for it in items if it is not None and "skipped" in it]
        items = [it for it in items if it is not None and "skipped" not in it]
        if not items:
            if skips:  # skip markers (LlavaJsonDataset(skip_markers=True)): DPVRTrainer moves on to the next batch
                return {"skipped": skips}
            raise DPVRError("empty batch: every sample in it was skipped")
        T = max(len(it["input_ids"]) for it in items)
        B = len(items)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            cols = slice(T - n, T) if self.padding_side == "left" else slice(0, n)
            input_ids[b, cols] = it["input_ids"]
            attention_mask[b, cols] = it["attention_mask"]
            if it.get("labels") is not None:
                labels[b, cols] = it["labels"]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixels = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)  # (n_images, 3, H, W), in batch order
        if self.keep_ids:
            batch["ids"] = [it.get("id") for it in items]
        if skips:
            batch["skipped"] = skips  # (reason, id, index) of the samples dropped from this batch
        return batch
