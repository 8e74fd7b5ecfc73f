"""Train the embedded tiny LLaVA from scratch on digit scenes, following LLaVA's own staged recipe.

    dpvr train-tiny --out src/dpvr/assets/tiny-llava --seed 0          # the shipped checkpoint
    dpvr train-tiny --out /tmp/tiny --vision-steps 100 --align-steps 50 --tune-steps 50   # a smoke run

Stages (a model trained end to end from random init stays at chance here; see docs/embedded.md):
  0. vision: the CLIP tower alone learns digits -- the mean of each cell's patch tokens feeds a
     linear 11-way head (10 digits + empty). The stand-in for LLaVA's pretrained CLIP.
  1. align: tower frozen, projector + language model learn to caption scenes ("bottom left 3 top left
     none ...", cells in a random order), the LLaVA-558k analogue; dense supervision that binds the
     position words to image regions.
  2. tune: projector + language model on the multi-turn instruction data (train.json, the LLaVA-665k
     analogue) with every `--caption-every`-th caption mixed in, so the reading learnt in stage 1 is
     kept while the question formats are learnt; the tower stays frozen, as in LLaVA-1.5.
Seeded throughout (data order included); the same seed and step counts give the same weights on the
same machine. `--minutes` is a safety cap: if reached, stage 2 stops early and the log says so.
Writes the checkpoint atomically, plus `training_log.json` and `training_curve.png` next to it.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpvr.atomic import atomic_write
from dpvr.data.collate import Collator
from dpvr.data.digit_scenes import load_split, open_benchmark
from dpvr.data.llava_json import LlavaJsonDataset
from dpvr.embedded.model import build_tiny_model, save_checkpoint
from dpvr.embedded.score import format_table, score

EMPTY_CLASS = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="checkpoint dir (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the data order and the benchmark")
    parser.add_argument("--data", default=None, help="digit-scenes dir (default: the cache for --seed)")
    parser.add_argument("--minutes", type=float, default=58.0, help="wall-clock cap for the whole run")
    parser.add_argument("--vision-steps", type=int, default=600)
    parser.add_argument("--align-steps", type=int, default=400)
    parser.add_argument("--tune-steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr of stage 1 (stage 0 uses 1e-3)")
    parser.add_argument("--tune-lr", type=float, default=5e-4, help="peak lr of stage 2 (lower: it starts from stage 1)")
    parser.add_argument("--caption-every", type=int, default=3,
                        help="stage 2 mixes in every N-th stage-1 caption (0: none)")  # fmt: skip
    parser.add_argument("--eval-every", type=int, default=150, help="tune steps between held-out checks")
    parser.add_argument("--eval-n", type=int, default=300, help="val questions per held-out check")
    parser.add_argument("--threads", type=int, default=2)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))  # cosine to 10% of peak


def _loader(ds, batch_size: int, seed: int, pad_id: int):
    g = torch.Generator().manual_seed(seed)
    collate = Collator(pad_token_id=pad_id, padding_side="right", keep_ids=False)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate, drop_last=True)


def _forever(loader):
    while True:
        yield from loader


def cell_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 4, D_v): mean of each 2x2-grid cell's patch tokens at the layer LLaVA reads."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    h = out.hidden_states[model.config.vision_feature_layer][:, 1:]  # (B, 64, D_v), CLS dropped
    B, N, D = h.shape
    side = int(N**0.5)  # 8 patches per side, 4 per cell
    return h.view(B, 2, side // 2, 2, side // 2, D).mean(dim=(2, 4)).reshape(B, 4, D)


def stage_vision(model, processor, train: list[dict], root: Path, steps: int, seed: int, bar, log: dict) -> None:
    from PIL import Image

    scenes = [s for s in train if "image" in s]
    images = [Image.open(root / "images" / s["image"]).convert("RGB") for s in scenes]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]  # (N, 3, 32, 32)
    cells = torch.tensor([[EMPTY_CLASS if d < 0 else d for d in s["meta"]["cells"]] for s in scenes])  # (N, 4)
    head = nn.Linear(model.config.vision_config.hidden_size, EMPTY_CLASS + 1)
    params = list(model.model.vision_tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    n_val = min(256, len(scenes) // 4)  # held-out scenes for the probe accuracy (the tail of train)
    for step in range(steps):
        idx = torch.randint(0, len(scenes) - n_val, (64,), generator=g)
        loss = nn.functional.cross_entropy(head(cell_features(model, pixels[idx])).flatten(0, 1), cells[idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1), bar.set_postfix(stage="vision", loss=f"{loss.item():.3f}")
    with torch.no_grad():
        pred = head(cell_features(model, pixels[-n_val:])).argmax(-1)
    log["vision_cell_accuracy"] = float((pred == cells[-n_val:]).float().mean())
    bar.write(f"stage 0 (vision): per-cell accuracy on {n_val} held-out scenes {log['vision_cell_accuracy']:.3f}")


def stage_lm(model, loader, params, steps: int, lr: float, bar, name: str, log: dict, deadline: float,
             eval_fn=None, eval_every: int = 0) -> None:  # fmt: skip
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    batches = _forever(loader)
    model.train()
    for step in range(steps):
        if time.monotonic() > deadline:
            note = log.setdefault("stopped_early", f"{name} stopped at step {step}/{steps}: --minutes cap reached")
            bar.write(note)
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
        batch = next(batches)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.update(1), bar.set_postfix(stage=name, loss=f"{loss.item():.3f}")
        if step % 10 == 0:
            log["loss"].append({"stage": name, "step": step, "loss": round(loss.item(), 4)})
        if eval_fn is not None and eval_every and (step + 1) % eval_every == 0:
            model.eval()
            fams = eval_fn()
            model.train()
            log["val"].append({"stage": name, "step": step + 1, **{f: round(r["accuracy"], 4) for f, r in fams.items()}})
            bar.write(f"{name} step {step + 1}: " + " ".join(f"{f} {r['accuracy']:.2f}" for f, r in fams.items()))
    model.eval()


def plot(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    offset = 0
    for name in ("align", "tune"):
        pts = [p for p in log["loss"] if p["stage"] == name]
        a.plot([offset + p["step"] for p in pts], [p["loss"] for p in pts], label=name)
        offset += log["steps"].get(name, 0)
    a.set(xlabel="LM step (align, then tune)", ylabel="train loss", yscale="log", title="loss")
    if log["loss"]:
        a.legend()
    fams = [k for k in (log["val"][0] if log["val"] else {}) if k not in ("stage", "step")]
    for f in fams:
        b.plot([p["step"] for p in log["val"]], [p[f] for p in log["val"]], marker="o", label=f)
    b.set(xlabel="tune step", ylabel="val accuracy", ylim=(0, 1.02), title="held-out accuracy per family")
    if fams:
        b.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed), np.random.seed(args.seed)
    t0 = time.monotonic()
    deadline = t0 + 60 * args.minutes
    root = open_benchmark(args.data, args.seed)
    model, processor = build_tiny_model(args.seed)
    pad = processor.tokenizer.pad_token_id
    log = {"command": f"dpvr train-tiny --seed {args.seed} --vision-steps {args.vision_steps} --align-steps "
                      f"{args.align_steps} --tune-steps {args.tune_steps} --batch-size {args.batch_size} --lr {args.lr} "
                      f"--tune-lr {args.tune_lr} --caption-every {args.caption_every}",
           "seed": args.seed, "steps": {"vision": args.vision_steps, "align": args.align_steps, "tune": args.tune_steps},
           "parameters": sum(p.numel() for p in model.parameters()), "loss": [], "val": []}  # fmt: skip
    train = load_split(root, "train")
    val = load_split(root, "val")[: args.eval_n]
    eval_fn = lambda: score(model, processor, val, root / "images")["families"]  # noqa: E731
    total = args.vision_steps + args.align_steps + args.tune_steps
    with tqdm(total=total, desc="train-tiny", unit="step", dynamic_ncols=True) as bar:
        stage_vision(model, processor, train, root, args.vision_steps, args.seed, bar, log)
        lm_params = list(model.model.multi_modal_projector.parameters()) + list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
        model.model.vision_tower.requires_grad_(False)
        pretrain = LlavaJsonDataset(root / "pretrain.json", root / "images", processor)
        stage_lm(model, _loader(pretrain, args.batch_size, args.seed + 1, pad), lm_params, args.align_steps,
                 args.lr, bar, "align", log, deadline)  # fmt: skip
        tune = LlavaJsonDataset(root / "train.json", root / "images", processor)
        if args.caption_every > 0:
            captions = torch.utils.data.Subset(pretrain, range(0, len(pretrain), args.caption_every))
            tune = torch.utils.data.ConcatDataset([tune, captions])
        stage_lm(model, _loader(tune, args.batch_size, args.seed + 2, pad), lm_params, args.tune_steps,
                 args.tune_lr, bar, "tune", log, deadline, eval_fn, args.eval_every)  # fmt: skip
    model.model.vision_tower.requires_grad_(True)  # saved weights carry no training state
    log["final_val"] = eval_fn()
    log["wall_minutes"] = round((time.monotonic() - t0) / 60, 2)
    print(format_table(log["final_val"]))

    def extra(tmp: Path) -> None:
        (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
        plot(log, tmp / "training_curve.png")

    out = save_checkpoint(model, processor, args.out, extra)
    print(f"wrote {out} in {log['wall_minutes']} min")
    return 0
