"""The stages `dpvr train-tiny` runs: the vision tower's pretraining, one language-model stage loop
(shared by the text, alignment and tuning stages), and growing the language model deeper.

Each stage takes the model, its data and its step budget, logs into the run's `log` dict and
advances the run's progress bar; `train_tiny` decides the order and the parameters each trains.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

from dpvr.data.collate import Collator
from dpvr.data.scene_questions import PATCH_WORDS, scene_tokens


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))  # cosine to 10% of peak


def loader(ds, batch_size: int, seed: int, pad_id: int):
    g = torch.Generator().manual_seed(seed)
    collate = Collator(pad_token_id=pad_id, padding_side="right", keep_ids=False)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate, drop_last=True)


def _forever(batches):
    while True:
        yield from batches


def patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, N, D_v): the patch tokens (CLS dropped) at the layer LLaVA reads."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def patch_targets(scenes: list[list[int]], patches_per_side: int) -> torch.Tensor:
    """(B, N): for each scene's cells (-1 empty), the worded scene's word at each patch (raster
    order) as an index into PATCH_WORDS: its cell's digit, or the cell's name at its first two."""
    grid = int(round(len(scenes[0]) ** 0.5))
    words = [scene_tokens(cells, patches_per_side // grid) for cells in scenes]
    return torch.tensor([[PATCH_WORDS.index(w) for w in row] for row in words])


def stage_vision(model, pixels: torch.Tensor, targets: torch.Tensor, steps: int, seed: int, bar, log: dict) -> None:
    """The stand-in for LLaVA's pretrained CLIP: the tower alone learns to tell, at every patch token,
    the word a worded scene holds there (its cell's digit or none, or the cell's name).
    pixels (N, 3, H, W), targets (N, side*side) from `patch_targets`."""
    head = nn.Linear(model.config.vision_config.hidden_size, len(PATCH_WORDS))
    params = list(model.model.vision_tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    n_val = min(256, len(pixels) // 4)  # held-out scenes for the probe accuracy (the tail)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 1e-3, warmup=min(50, steps // 10 + 1))
        idx = torch.randint(0, len(pixels) - n_val, (64,), generator=g)
        logits = head(patch_features(model, pixels[idx]))  # (64, N, len(PATCH_WORDS))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets[idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1), bar.set_postfix(stage="vision", loss=f"{loss.item():.3f}")
    with torch.no_grad():
        pred = head(patch_features(model, pixels[-n_val:])).argmax(-1)
    log["vision_patch_accuracy"] = float((pred == targets[-n_val:]).float().mean())
    bar.write(f"vision: per-patch accuracy on {n_val} held-out scenes {log['vision_patch_accuracy']:.3f}")


def stage_lm(model, batches, params, steps: int, lr: float, bar, name: str, log: dict, deadline: float,
             eval_fn: Callable[[], dict] | None = None, eval_every: int = 0) -> int:
    """AdamW on `params` for up to `steps` batches (cosine schedule), checking `eval_fn` (held-out
    accuracy per family) every `eval_every` steps; ends early at the run's deadline. Returns the steps taken."""
    t0 = time.monotonic()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    batches = _forever(batches)
    model.train()
    taken = 0
    for step in range(steps):
        if time.monotonic() > deadline:
            note = log.setdefault("stopped_early", f"{name} stopped at step {step}/{steps}: --minutes cap reached")
            bar.write(note)
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(50, steps // 10 + 1))
        loss = model(**next(batches)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        taken = step + 1
        bar.update(1), bar.set_postfix(stage=name, loss=f"{loss.item():.3f}")
        if step % 10 == 0:
            log["loss"].append({"stage": name, "step": step, "loss": round(loss.item(), 4)})
        if eval_fn is not None and eval_every and taken % eval_every == 0:
            model.eval()
            acc = eval_fn()
            model.train()
            log["val"].append({"stage": name, "step": taken, **{f: round(a, 4) for f, a in acc.items()}})
            bar.write(f"{name} step {taken}: " + " ".join(f"{f} {a:.2f}" for f, a in acc.items()))
    bar.update(steps - taken)  # a stage that ends early leaves no gap in the bar
    log["steps_taken"][name] = taken
    log.setdefault("stage_minutes", {})[name] = round((time.monotonic() - t0) / 60, 2)
    model.eval()
    return taken


def grow(model, deep):
    """Copy `model` into `deep` (same config, more text layers) by stacking: text layer i of `deep`
    starts as layer i mod n of `model` (n its depth), so every added layer starts as a trained
    layer doing real work. (Added as identity maps, the grown layers stayed the identity however
    they were trained afterwards: docs/embedded.md.)"""
    missing, unexpected = deep.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    n = model.config.text_config.num_hidden_layers
    layers = deep.model.language_model.layers
    for i in range(n, len(layers)):
        layers[i].load_state_dict(layers[i % n].state_dict())
    new = {k for k in missing if ".layers." in k and int(k.split(".layers.")[1].split(".")[0]) >= n}
    assert set(missing) == new, set(missing) - new
    return deep
