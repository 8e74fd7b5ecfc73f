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
# what a family's processor returns per image (concatenated over the batch, in order) and per token
# (padded like input_ids): LLaVA's pixel_values; anyres tiles with image_sizes; Qwen2-VL's patches with
# image_grid_thw and mm_token_type_ids
IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")
TOKEN_KEYS = ("mm_token_type_ids",)


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
        per_token = {k: torch.zeros((B, T), dtype=torch.long) for k in TOKEN_KEYS if any(k in it for it in items)}
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            cols = slice(T - n, T) if self.padding_side == "left" else slice(0, n)
            input_ids[b, cols] = it["input_ids"]
            attention_mask[b, cols] = it["attention_mask"]
            if it.get("labels") is not None:
                labels[b, cols] = it["labels"]
            for key, values in per_token.items():  # padded with 0 (text), like the processors
                values[b, cols] = it.get(key, 0)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **per_token}
        with_image = [it for it in items if it.get("pixel_values") is not None]
        for key in IMAGE_KEYS:
            if with_image and key in with_image[0]:  # (n_images, ...), in batch order
                batch[key] = _cat_padded([it[key] for it in with_image])
        if self.keep_ids:
            batch["ids"] = [it.get("id") for it in items]
        if skips:
            batch["skipped"] = skips  # (reason, id, index) of the samples dropped from this batch
        return batch


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0; anyres pixel_values (1, crops, 3, H, W) of different crop counts are
    zero-padded to the most crops, as the processors do (the model reads each image's count from image_sizes)."""
    if parts[0].dim() == 5:
        most = max(p.shape[1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in parts]
    return torch.cat(parts, dim=0)
