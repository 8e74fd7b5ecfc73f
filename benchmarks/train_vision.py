"""Research script (issue 16): does a comparison learnt in text transfer to image tokens?

LLaVA's stages on a reduced problem, with a language model from benchmarks/train_text.py:
  0. vision: a stock CLIPVisionModel + linear head on each cell's mean patch token (11-way), alone;
  1. align: projector only (tower and LM frozen), on the QA loss;
  2. tune: projector + LM (tower frozen).
The image's patch tokens take the place of the scene words (the text model must have been trained
with --form patchK where K = 16 / patch, i.e. the same token layout), so a projector that maps a
cell's patches onto its digit word's embedding would hand the text skill over unchanged.

    nice -n 19 .venv/bin/python benchmarks/train_vision.py --name v2 --lm benchmarks/ckpt/X.pt --patch 8
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from textworld import FAMILIES, ID, TINTS, World, batch, render
from train_text import LOGS, build

CELL = 16


def args_(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--lm", required=True, help="checkpoint from train_text.py --save")
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--vision-steps", type=int, default=150)
    p.add_argument("--align-steps", type=int, default=150)
    p.add_argument("--tune-steps", type=int, default=150)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--weights", default="", help="family=w,... for training turns (default all 1)")
    p.add_argument("--lm-random", action="store_true", help="control: same LM shape, no text stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--log-dir", default=str(LOGS), help="where <name>.jsonl goes (default: %(default)s)")
    return p.parse_args(argv)


class Images:
    """Renders scenes from disjoint scan pools (train / test), as dpvr's digit scenes do."""

    def __init__(self, grid: int, seed: int):
        from sklearn.datasets import load_digits

        from dpvr.data.digit_scenes import scan_pools

        d = load_digits()
        self.images, self.targets, self.grid = d.images, d.target, grid
        self.pools = {k: v for k, v in scan_pools(seed).items()}

    def pixels(self, rng, cells_list, split: str) -> torch.Tensor:
        pool = self.pools[split]
        out = []
        for cells in cells_list:
            scans = [int(rng.choice(pool[self.targets[pool] == c])) if c >= 0 else -1 for c in cells]
            tints = [int(rng.integers(len(TINTS))) for _ in cells]
            img = render(self.grid, cells, scans, tints, self.images)  # (H, W, 3) in [0, 1]
            out.append(torch.tensor(img, dtype=torch.float32).permute(2, 0, 1))
        return torch.stack(out) * 2 - 1


def cell_index(grid: int, patch: int) -> torch.Tensor:
    """Cell number of each patch token, in raster order."""
    k, n = CELL // patch, grid * CELL // patch
    return torch.tensor([(r // k) * grid + c // k for r in range(n) for c in range(n)])


class VLM(torch.nn.Module):
    def __init__(self, lm, grid: int, patch: int):
        super().__init__()
        cfg = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                               image_size=grid * CELL, patch_size=patch, num_channels=3)  # fmt: skip
        self.tower = CLIPVisionModel(cfg)
        h = lm.config.hidden_size
        self.proj = torch.nn.Sequential(torch.nn.Linear(128, h), torch.nn.GELU(), torch.nn.Linear(h, h))
        self.lm, self.n_img = lm, (grid * CELL // patch) ** 2
        self.head = torch.nn.Linear(128, 11)  # stage 0 only
        self.cells = cell_index(grid, patch)

    def features(self, pix):
        return self.tower(pixel_values=pix).last_hidden_state[:, 1:]  # CLS dropped

    def cell_logits(self, pix):
        f = self.features(pix)
        g = int(self.cells.max()) + 1
        mean = torch.stack([f[:, self.cells == c].mean(1) for c in range(g)], 1)
        return self.head(mean)

    def forward(self, ids, pix, labels=None, **kw):
        emb = self.lm.get_input_embeddings()(ids)
        emb = torch.cat([emb[:, :1], self.proj(self.features(pix)), emb[:, 1 + self.n_img :]], 1)
        return self.lm(inputs_embeds=emb, labels=labels, **kw)


def schedule(opt, steps, warmup=20):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )


@torch.no_grad()
def evaluate(vlm, sets) -> dict:
    vlm.eval()
    out = {}
    for fam, (ids, pix, spans) in sets.items():
        pred = vlm(ids, pix).logits.argmax(-1)
        ok = [bool((pred[b, sp[0][1] - 1 : sp[0][1] - 1 + sp[0][2]] == ids[b, sp[0][1] : sp[0][1] + sp[0][2]]).all()) for b, sp in enumerate(spans)]
        out[fam] = round(float(np.mean(ok)), 3)
        if fam == "pope":
            out["pope_yes_share"] = round(float(np.mean([VOCAB_YES == int(pred[b, sp[0][1] - 1]) for b, sp in enumerate(spans)])), 3)
    vlm.train()
    return out


@torch.no_grad()
def attention_profile(vlm, sets) -> list[float]:
    vlm.eval()
    vlm.lm.set_attn_implementation("eager")
    ids, pix, spans = sets["pope"]
    att = vlm(ids, pix, output_attentions=True).attentions
    q = torch.tensor([sp[0][1] - 1 for sp in spans])
    prof = [round(float(a[torch.arange(len(q)), :, q][..., 1 : 1 + vlm.n_img].sum(-1).mean()), 3) for a in att]
    vlm.lm.set_attn_implementation("sdpa")
    vlm.train()
    return prof


def eval_sets(world, imgs, weights, n: int, erng) -> dict:
    """{family: (ids, pixels, spans)}: n held-out one-turn questions per trained family, test-pool scans."""
    sets = {}
    for f in [f for f in FAMILIES if weights[f] > 0]:
        scenes = [world.scene(erng) for _ in range(n)]
        ids, _, spans = batch(world, erng, n, 1, fams=[f], scenes=scenes)
        sets[f] = (ids, imgs.pixels(erng, scenes, "test"), spans)
    return sets


def vision_stage(vlm, world, imgs, steps: int, rng, erng, write) -> None:
    """Stage 0: the tower (and its per-cell head) learns digits per cell; frozen afterwards."""
    opt = torch.optim.AdamW([*vlm.tower.parameters(), *vlm.head.parameters()], lr=1e-3)
    sch = schedule(opt, steps)
    for step in range(steps + 1):
        scenes = [world.scene(rng) for _ in range(64)]
        target = torch.tensor(scenes).clamp(min=-1) % 11  # none -> 10
        if step % 50 == 0 or step == steps:
            with torch.no_grad():
                es = [world.scene(erng) for _ in range(100)]
                acc = (vlm.cell_logits(imgs.pixels(erng, es, "test")).argmax(-1) == torch.tensor(es) % 11).float().mean()
            write({"stage": "vision", "step": step, "cell_acc": round(float(acc), 3)})
        if step == steps:
            break
        loss = torch.nn.functional.cross_entropy(vlm.cell_logits(imgs.pixels(rng, scenes, "train")).flatten(0, 1), target.flatten())
        loss.backward()
        opt.step(), sch.step(), opt.zero_grad()
    vlm.tower.requires_grad_(False)


def qa_stage(vlm, world, imgs, a, stage: str, steps: int, params: list, lr: float, sets, rng, write, over) -> None:
    """Stage 1 (align) or 2 (tune): `params` learn the QA loss; evaluations every a.eval_every steps."""
    vlm.lm.requires_grad_(stage == "tune")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98))
    sch = schedule(opt, steps)
    losses = []
    for step in range(steps + 1):
        stop = over()
        if step % a.eval_every == 0 or step == steps or stop:
            write({"stage": stage, "step": step, "loss": round(float(np.mean(losses[-a.eval_every:])), 4) if losses else None, **evaluate(vlm, sets)})
        if step == steps or stop:
            break
        scenes = [world.scene(rng) for _ in range(a.batch)]
        ids, lab, _ = batch(world, rng, a.batch, a.turns, scenes=scenes)
        loss = vlm(ids, imgs.pixels(rng, scenes, "train"), labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sch.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    write({"stage": stage, "attention_on_image": attention_profile(vlm, sets)})


def main(argv: list[str] | None = None):
    global VOCAB_YES
    a = args_(argv)
    torch.set_num_threads(1)
    ck = torch.load(a.lm)
    la = argparse.Namespace(**ck["args"])
    la.grow_from = ""
    lm = build(la)
    if not a.lm_random:
        lm.load_state_dict(ck["state"])
    VOCAB_YES = ID["yes"]
    grid, k = la.grid, CELL // a.patch
    assert la.form == ("bare" if k == 1 else f"patch{k}") or la.form == f"patch{k}", (la.form, k)
    weights = {f: float(f != "probe") for f in FAMILIES}
    for kv in filter(None, a.weights.split(",")):
        k_, v = kv.split("=")
        weights[k_] = float(v)
    world = World(grid, form=la.form, weights=weights)
    imgs = Images(grid, a.seed)
    vlm = VLM(lm, grid, a.patch)
    torch.manual_seed(a.seed)
    rng, erng = np.random.default_rng(a.seed), np.random.default_rng(20_000 + a.seed)
    sets = eval_sets(world, imgs, weights, a.eval_n, erng)
    Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(a.log_dir) / f"{a.name}.jsonl", "w")
    log.write(json.dumps({"args": vars(a), "lm_args": ck["args"]}) + "\n")
    t0 = time.time()

    def write(rec):
        rec["wall"] = round(time.time() - t0, 1)
        print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()

    vision_stage(vlm, world, imgs, a.vision_steps, rng, erng, write)
    over = lambda: time.time() - t0 > a.minutes * 60  # noqa: E731
    qa_stage(vlm, world, imgs, a, "align", a.align_steps, list(vlm.proj.parameters()), 1e-3, sets, rng, write, over)
    tune = [*vlm.proj.parameters(), *vlm.lm.parameters()]
    qa_stage(vlm, world, imgs, a, "tune", a.tune_steps, tune, 3e-4, sets, rng, write, over)


if __name__ == "__main__":
    main()
