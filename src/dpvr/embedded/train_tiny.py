"""Train the embedded tiny LLaVA from scratch on digit scenes, following LLaVA's own staged recipe.

    dpvr train-tiny --out src/dpvr/assets/tiny-llava --seed 0          # the shipped checkpoint
    dpvr train-tiny --out /tmp/tiny --vision-steps 20 --existence-steps 20 --text-steps 5 \
        --align-steps 5 --tune-steps 5                                  # a smoke run

Stages (a model trained end to end from random init stays at chance here; docs/embedded.md has
what each stage measured):
  vision    the CLIP tower alone learns, at every patch token, the word the worded scene has there
            (its cell's digit or none, or the cell's name): the stand-in for LLaVA's pretrained CLIP.
  existence the language model (shallow: `--shallow-layers`) is pretrained on text only, as LLaVA's
            was, on `text.json`'s worded scenes (each cell's name and digit word laid out where its
            image tokens will be): first the existence questions alone ("is there a 7 in the image
            ?"), for all its steps (the lookup is learnt alone, not mixed in from the start; stopped
            at its first held-out 0.95, it was lost again in the mix).
  text      the language model grows to its full depth by stacking (the added layers start as
            copies of the trained ones) and the whole stack continues on every family, so the
            families not learnt yet are learnt by all the layers.
  align     tower and language model frozen, the projector learns to put image tokens where the
            words were (captions and QA turns: the LLaVA-558k stage).
  tune      projector + language model on the multi-turn instruction data (the LLaVA-665k
            analogue) with every `--caption-every`-th caption; the tower stays frozen, as in LLaVA-1.5.
Seeded throughout (data order included); the same seed and step counts give the same weights on the
same machine. `--minutes` is a safety cap: once reached, every remaining stage stops and the log
says where. Writes the checkpoint atomically, plus `training_log.json` and `training_curve.png`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dpvr.atomic import atomic_write

# numpy, torch and the training stages are imported in run(): `dpvr train-tiny --help` answers at once

STAGES = ("vision", "existence", "text", "align", "tune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="checkpoint dir (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the data order and the benchmark")
    parser.add_argument("--data", default=None, help="digit-scenes dir (default: the cache for --seed)")
    parser.add_argument("--minutes", type=float, default=115.0, help="wall-clock cap for the whole run")
    parser.add_argument("--shallow-layers", type=int, default=4, help="language-model depth of the text stages")
    parser.add_argument("--vision-steps", type=int, default=1000)
    parser.add_argument("--existence-steps", type=int, default=750)
    parser.add_argument("--text-steps", type=int, default=400)
    parser.add_argument("--align-steps", type=int, default=150)
    parser.add_argument("--tune-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr of the text stages and align")
    parser.add_argument("--tune-lr", type=float, default=3e-4, help="peak lr of tune (it starts trained)")
    parser.add_argument("--caption-every", type=int, default=3,
                        help="tune mixes in every N-th caption (0: none)")  # fmt: skip
    parser.add_argument("--eval-every", type=int, default=50, help="steps between held-out checks")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out questions per check")
    parser.add_argument("--threads", type=int, default=2)


def first_turns(samples: list[dict]) -> list[dict]:
    """Single-question held-out samples from multi-turn ones: the first turn, under its own family
    (captions left out: the check decodes short answers)."""
    out = []
    for s in samples:
        turn = s["meta"]["turns"][0]
        if turn["family"] != "caption":
            out.append({**s, "conversations": s["conversations"][:2], "meta": {**turn, "question": None}})
    return out


def _accuracies(model, processor, samples, images) -> dict[str, float]:
    from dpvr.embedded.score import score

    fams = score(model, processor, samples, images)["families"]
    return {f: r["accuracy"] for f, r in fams.items()}


def _lm_params(model) -> list:
    return list(model.model.language_model.parameters()) + list(model.lm_head.parameters())


def _vision_data(processor, train: list[dict], root: Path):
    from PIL import Image

    from dpvr.embedded.stages import patch_targets

    scenes = [s for s in train if "image" in s]
    images = [Image.open(root / "images" / s["image"]).convert("RGB") for s in scenes]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]  # (N, 3, 48, 48)
    side = int(round(pixels.shape[-1] / processor.patch_size))  # patches per image side
    return pixels, patch_targets([s["meta"]["cells"] for s in scenes], side)  # (N, side*side)


def _new_log(args: argparse.Namespace, steps: dict) -> dict:
    """The training log's header: the command that reproduces the run, its seed and step budget."""
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
                     if k not in ("out", "data", "threads", "debug"))  # fmt: skip
    return {"command": f"dpvr train-tiny {flags}", "seed": args.seed, "steps": steps, "steps_taken": {}, "loss": [],
            "val": []}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from dpvr.data.digit_scenes import load_split, open_benchmark
    from dpvr.data.llava_json import LlavaJsonDataset
    from dpvr.data.scene_questions import TEXT_WEIGHTS
    from dpvr.embedded.model import TEXT_LAYERS, build_tiny_model
    from dpvr.embedded.score import format_table, score
    from dpvr.embedded.stages import grow, loader, stage_lm, stage_vision

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed), np.random.seed(args.seed)
    t0 = time.monotonic()
    deadline = t0 + 60 * args.minutes
    root = open_benchmark(args.data, args.seed)
    model, processor = build_tiny_model(args.seed, text_layers=args.shallow_layers)
    pad = processor.tokenizer.pad_token_id
    steps = {name: getattr(args, f"{name}_steps") for name in STAGES}
    log = _new_log(args, steps)
    train = load_split(root, "train")
    text = load_split(root, "text")
    held = {part: [s for s in text if s["meta"]["part"] == part] for part in TEXT_WEIGHTS}
    n_held = {part: min(args.eval_n, len(rows) // 4) for part, rows in held.items()}  # the tail is held out
    text_val = {part: first_turns(rows[len(rows) - n_held[part] :]) for part, rows in held.items()}
    text_train = {part: rows[: len(rows) - n_held[part]] for part, rows in held.items()}
    image_val = load_split(root, "val")[: args.eval_n]
    images = root / "images"
    check_text = lambda: _accuracies(model, processor, text_val["all"], images)  # noqa: E731
    check_images = lambda: _accuracies(model, processor, image_val, images)  # noqa: E731
    lm_loader = lambda rows, k: loader(LlavaJsonDataset(rows, images, processor), args.batch_size, args.seed + k, pad)  # noqa: E731
    with tqdm(total=sum(steps.values()), desc="train-tiny", unit="step", dynamic_ncols=True) as bar:
        stage_vision(model, *_vision_data(processor, train, root), steps["vision"], args.seed, bar, log)
        model.model.vision_tower.requires_grad_(False)
        stage_lm(model, lm_loader(text_train["existence"], 1), _lm_params(model), steps["existence"], args.lr, bar,
                 "existence", log, deadline, lambda: _accuracies(model, processor, text_val["existence"], images),
                 args.eval_every)  # fmt: skip
        model = grow(model, build_tiny_model(args.seed, text_layers=TEXT_LAYERS)[0])
        model.model.vision_tower.requires_grad_(False)
        stage_lm(model, lm_loader(text_train["all"], 2), _lm_params(model), steps["text"], args.lr, bar, "text", log,
                 deadline, check_text, args.eval_every)  # fmt: skip
        model.model.language_model.requires_grad_(False), model.lm_head.requires_grad_(False)
        pretrain = load_split(root, "pretrain")
        projector = list(model.model.multi_modal_projector.parameters())
        stage_lm(model, lm_loader(pretrain + train, 4), projector, steps["align"], args.lr, bar, "align", log,
                 deadline, check_images, args.eval_every)  # fmt: skip
        model.model.language_model.requires_grad_(True), model.lm_head.requires_grad_(True)
        captions = pretrain[:: args.caption_every] if args.caption_every > 0 else []
        stage_lm(model, lm_loader(train + captions, 5), projector + _lm_params(model), steps["tune"], args.tune_lr,
                 bar, "tune", log, deadline, check_images, args.eval_every)  # fmt: skip
    model.requires_grad_(True)  # saved weights carry no training state
    log["parameters"] = sum(p.numel() for p in model.parameters())
    log["final_val"] = score(model, processor, load_split(root, "val"), images)["families"]
    log["final_text_val"] = check_text()
    log["wall_minutes"] = round((time.monotonic() - t0) / 60, 2)
    print(format_table(log["final_val"]))
    return _save(model, processor, args.out, log)


def _save(model, processor, out: str, log: dict) -> int:
    """The checkpoint with its training log and curve, written atomically."""
    from dpvr.embedded.model import save_checkpoint

    def extra(tmp: Path) -> None:
        (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
        plot(log, tmp / "training_curve.png")

    path = save_checkpoint(model, processor, out, extra)
    print(f"wrote {path} in {log['wall_minutes']} min")
    return 0


def plot(log: dict, path: Path) -> None:
    """Loss over all language-model stages end to end, and the held-out accuracy per family."""
    from matplotlib.figure import Figure  # not pyplot: no backend switch, no global figure registry

    fig = Figure(figsize=(11, 3.8))
    a, b = fig.subplots(1, 2)
    offsets, offset = {}, 0
    for name in STAGES[1:]:
        offsets[name] = offset
        pts = [p for p in log["loss"] if p["stage"] == name]
        a.plot([offset + p["step"] for p in pts], [p["loss"] for p in pts], label=name)
        offset += log["steps_taken"].get(name, 0)
    a.set(xlabel="language-model step (all stages)", ylabel="train loss", yscale="log", title="loss")
    if log["loss"]:
        a.legend(fontsize=7)
    fams = sorted({k for p in log["val"] for k in p if k not in ("stage", "step")})
    for f in fams:
        pts = [p for p in log["val"] if f in p]
        b.plot([offsets[p["stage"]] + p["step"] for p in pts], [p[f] for p in pts], marker=".", label=f)
    for name, x in offsets.items():
        b.axvline(x, color="0.85", lw=0.8)
    b.set(xlabel="language-model step (all stages)", ylabel="held-out accuracy", ylim=(0, 1.02),
          title="held-out accuracy per family (text, then images)")  # fmt: skip
    if fams:
        b.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
