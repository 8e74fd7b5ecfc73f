"""Train a side branch without re-running the frozen shared stack: its output, computed once per sample.

DPVR freezes everything but the side branch, so what reaches the split (vision tower, projector,
embeddings, layers [0, split)) is the same for a sample in every step, epoch, seed and side-branch
variant (D, and for PC/KV also K) on that base and split; so is LF's text path from the split to its
first fusion layer, which never reads the side branch. `dpvr train --shared-stack-cache DIR` runs
that frozen part once over the data (no grad, a progress bar) into DIR/<key>-split<s>.safetensors
(and, where LF's text path goes on, DIR/<key>-split<s>-text<t>.safetensors, computed from the first),
then trains and scores the held-out loss from there: the forward starts at the split, with LF's text
positions at its first fusion layer (`forward(shared_states=...)`). A deeper split's fill starts from
the deepest shallower split cached under the same key and runs only the layers between (a split
sweep fills each layer once, not once per split).

    data = cached(model, dataset, "runs/shared-stack", batch_size=16)   # a Dataset of cached items
    trainer = DPVRTrainer(..., train_dataset=data, data_collator=CachedCollator(collate))

What it saves, measured, is in docs/train.md. It pays when a sample is read more than once: several
epochs, or several runs on one split (seeds, K, D, fusion placement). The file holds the states in
the model's dtype (sequence length x hidden size per sample) and the fill holds them in memory once:
it is for data sets read many times (the reproduction's 6k samples), not LLaVA-665k on a 7B model
(terabytes). The key covers the model files, attention and dtype, and the samples with how they are
rendered; a different one computes a new file. Writes are atomic and a fill holds a lock on its file,
so processes sharing DIR never read half a file and compute each file once (one fills, the others
wait for it; under DDP every rank waits for the first)."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dpvr.atomic import atomic_write, locked
from dpvr.errors import DPVRError
from dpvr.routing.schedule import frozen_text_depth, split_schedule

FIELDS = ("input_ids", "attention_mask", "labels")  # per token, beside the states and positions


def cache_key(model, dataset) -> str:
    """What the cached states depend on besides the split, hashed: the base's files, the numerics, and
    the samples with their rendering (the shared stack runs every token through the stock layers in
    every mode with a split, so the files of one key differ only in how deep they go)."""
    root = Path(model.name_or_path)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in root.glob("*") if f.is_file()) if root.is_dir() else []
    what = {"model": str(root), "files": files, "dtype": str(model.dtype),
            "attn": model.config._attn_implementation, "samples": dataset.samples, "template": dataset.template,
            "max_length": dataset.max_length, "images": str(dataset.images_dir)}  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def check_cacheable(model) -> None:
    """The shared stack must be frozen and deterministic for its output to be computed once."""
    cfg = model.dpvr_config
    if cfg.freeze == "none":
        raise DPVRError("--shared-stack-cache needs the shared stack frozen (DPVRConfig.freeze='all_but_side_branch')")
    if getattr(model.config.text_config, "attention_dropout", 0.0):
        raise DPVRError("--shared-stack-cache needs a deterministic shared stack: text_config.attention_dropout is not 0")
    split_schedule(cfg, model.num_text_layers)  # refuses modes without a split and shallow FastV


def cache_file(folder, key: str, split: int, text: int | None = None) -> Path:
    """The states after the split, with the text positions `text` layers deep (the split when None)."""
    deeper = f"-text{text}" if text is not None and text > split else ""
    return Path(folder) / f"{key}-split{split}{deeper}.safetensors"


def _shallower(folder, key: str, split: int) -> tuple[Path, int] | None:
    """The deepest split below `split` cached under `key`, as (its file, the split), or None."""
    name = re.compile(rf"{key}-split(\d+)\.safetensors")  # not the atomic writes' dot-prefixed temp files
    found = [(f, int(m[1])) for f in Path(folder).glob(f"{key}-split*") if (m := name.fullmatch(f.name))]
    return max((x for x in found if x[1] < split), key=lambda x: x[1], default=None)


@torch.no_grad()
def _fill(model, dataset, collate, batch_size: int, what: str, from_layer: int, text_path: bool) -> dict[str, torch.Tensor]:
    """Every sample's states after the shared stack (and with text_path, LF's text path), and its token
    fields, as flat named tensors. from_layer > 0: `dataset` is a shallower split's CachedDataset, and
    its states go on from there."""
    tensors: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc=f"shared stack: {what}", unit="batch"):
            idx = list(range(start, min(start + batch_size, len(dataset))))
            items = [dataset[i] for i in idx]
            keep = [(i, it) for i, it in zip(idx, items) if it is not None and "skipped" not in it]
            if not keep:
                continue
            batch = collate([it for _, it in keep])  # a cached batch: + shared_states, position_ids
            inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
            states, pos = model.shared_stack_states(**inputs, from_layer=from_layer, text_path=text_path)  # (B, T, D), (B, T) or (3, B, T)
            for b, (i, it) in enumerate(keep):
                n = len(it["input_ids"])  # right padding: the sample's tokens are its first n positions
                tensors[f"{i}.states"] = states[b, :n].cpu().contiguous()
                # a copy: a text-only batch's positions are one arange expanded over the batch, so the
                # samples' slices overlap in memory, which safetensors refuses
                tensors[f"{i}.positions"] = pos[..., b, :n].cpu().clone(memory_format=torch.contiguous_format)
                tensors.update({f"{i}.{k}": it[k].contiguous() for k in FIELDS})
    finally:
        model.train(was_training)
    return tensors


def cached(model, dataset, folder, batch_size: int, what: str = "train") -> "CachedDataset":
    """`dataset` with each sample's frozen-part output read from folder (computed there first if absent:
    the split's states from the deepest shallower split there if any, then LF's text path from them)."""
    check_cacheable(model)
    key, split = cache_key(model, dataset), model.dpvr_config.split_layer
    depth = frozen_text_depth(model.dpvr_config, model.num_text_layers)
    for text in dict.fromkeys((split, depth)):  # the split's states first: the text path goes on from them
        path = cache_file(folder, key, split, text)
        if not path.exists():
            with locked(path):  # side by side, one process fills, the others wait ...
                if not path.exists():  # ... and read its file
                    _fill_file(model, dataset, folder, key, split, text, batch_size, what)
    return CachedDataset(path, dataset)


def _fill_file(model, dataset, folder, key: str, split: int, text: int, batch_size: int, what: str) -> None:
    from dpvr.data.collate import Collator

    collate = Collator(pad_token_id=dataset.processor.tokenizer.pad_token_id, padding_side="right", keep_ids=False)
    source, start = dataset, 0
    if text > split:
        source, start, collate = CachedDataset(cache_file(folder, key, split), dataset), split, CachedCollator(collate)
        what = f"{what}, text path {split}-{text - 1} on split {split}'s cache"
    elif below := _shallower(folder, key, split):
        source, start, collate = CachedDataset(below[0], dataset), below[1], CachedCollator(collate)
        what = f"{what}, layers {start}-{split - 1} on split {start}'s cache"
    tensors = _fill(model, source, collate, batch_size, what, from_layer=start, text_path=text > split)
    metadata = {"samples": str(len(dataset))}
    atomic_write(cache_file(folder, key, split, text), lambda tmp: save_file(tensors, tmp, metadata=metadata))


class CachedDataset(torch.utils.data.Dataset):
    """Items {input_ids, attention_mask, labels (T,), positions (T,) or (3, T), shared_states (T, D)};
    a sample the dataset skipped is asked of it again (its skip marker, counted by it)."""

    def __init__(self, path: Path, dataset):
        self.path, self.dataset = path, dataset
        self._file = None  # opened in the process that reads (DataLoader workers open their own)
        with safe_open(path, "pt") as f:
            self._present = {int(k.split(".")[0]) for k in f.keys()}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict | None:
        if i not in self._present:
            return self.dataset[i]
        if self._file is None:
            self._file = safe_open(self.path, "pt")
        item = {k: self._file.get_tensor(f"{i}.{k}") for k in FIELDS}
        item["positions"] = self._file.get_tensor(f"{i}.positions")
        item["shared_states"] = self._file.get_tensor(f"{i}.states")
        return item

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    def __getattr__(self, name):  # skipped, record_skip, samples, ...: the dataset's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class CachedCollator:
    """Pads the cached items' states (B, T, D) and positions (B, T) or (3, B, T) beside what `collate`
    (the training Collator, right padding) makes of the token fields."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items: list[dict | None]) -> dict:
        states = [it.pop("shared_states") for it in items if it is not None and "shared_states" in it]
        positions = [it.pop("positions") for it in items if it is not None and "positions" in it]
        batch = self.collate(items)
        if "input_ids" not in batch:
            return batch
        if "pixel_values" in batch or len(states) != batch["input_ids"].shape[0]:
            raise DPVRError("a batch mixes cached and uncached samples: the shared-stack cache misses some of them")
        B, T = batch["input_ids"].shape
        shared = states[0].new_zeros(B, T, states[0].shape[-1])
        pos = positions[0].new_zeros(*positions[0].shape[:-1], B, T)
        for b, (h, p) in enumerate(zip(states, positions)):
            shared[b, : len(h)] = h
            pos[..., b, : p.shape[-1]] = p
        batch["shared_states"], batch["position_ids"] = shared, pos
        return batch
