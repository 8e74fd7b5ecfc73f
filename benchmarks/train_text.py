"""Research script (issue 16): text-only stage, stock LlamaForCausalLM on worded scenes.

    nice -n 19 .venv/bin/python benchmarks/train_text.py --name t4 --grid 2 --layers 4 --minutes 4

Logs one JSON line per eval to docs/evidence/<name>.jsonl (or --log-dir): step, wall seconds, loss, held-out
exact-match accuracy per family (teacher-forced argmax on every answer token == greedy answer),
POPE's predicted yes share, and at the end the attention share on scene tokens per layer.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from textworld import EOS, FAMILIES, PAD, VOCAB, World, batch

LOGS = Path(__file__).resolve().parents[1] / "docs" / "evidence"


def args_(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--grid", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=400, help="cosine horizon (to 10%% of lr)")
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--weights", default="", help="family=w,... (default all 1)")
    p.add_argument("--lm-loss", action="store_true", help="loss on every token, not only answers")
    p.add_argument("--curriculum", type=int, default=0, help="steps to ramp max filled cells 1 -> all")
    p.add_argument("--fam-curriculum", type=int, default=0, help="steps of POPE-only turns before the --weights mix")
    p.add_argument("--grow-from", default="", help="state dict of a shallower model; new layers appended, zero-init outputs")
    p.add_argument("--form", default="named", help="named | bare | patchK (see textworld.World)")
    p.add_argument("--init-std", type=float, default=0.02, help="LlamaConfig.initializer_range (HF default 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--save", default="")
    p.add_argument("--log-dir", default=str(LOGS), help="where <name>.jsonl goes (default: %(default)s)")
    return p.parse_args(argv)


def build(a) -> LlamaForCausalLM:
    torch.manual_seed(a.seed)
    cfg = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.6875) // 8 * 8,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
        max_position_embeddings=512, tie_word_embeddings=a.tied, pad_token_id=PAD, bos_token_id=1, initializer_range=getattr(a, 'init_std', 0.02), eos_token_id=EOS,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if a.grow_from:
        sd = torch.load(a.grow_from)
        grow(model, sd.get("state", sd))
    return model


def grow(model, sd: dict) -> None:
    """Copy a shallower model into the first layers; the new top layers start as identities
    (o_proj and down_proj zero), so the grown model computes exactly what the shallow one did."""
    n_old = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    missing = model.load_state_dict(sd, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    for layer in model.model.layers[n_old:]:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)


def eval_set(world: World, seed: int, n: int):
    rng = np.random.default_rng(10_000 + seed)
    return {f: batch(world, rng, n, 1, fams=[f]) for f in FAMILIES}


@torch.no_grad()
def evaluate(model, sets) -> dict:
    model.eval()
    out = {}
    for fam, (ids, _, spans) in sets.items():
        pred = model(input_ids=ids).logits.argmax(-1)
        ok, yes = [], 0
        for b, sp in enumerate(spans):
            _, start, n, _, ans = sp[0]
            got = pred[b, start - 1 : start - 1 + n]
            ok.append(bool((got == ids[b, start : start + n]).all()))
            yes += int(VOCAB[int(got[0])] == "yes")
        out[fam] = round(float(np.mean(ok)), 3)
        if fam == "pope":
            out["pope_yes_share"] = round(yes / len(spans), 3)
    model.train()
    return out


@torch.no_grad()
def attention_profile(model, sets, scene_len: int) -> list[float]:
    """Share of the last question token's attention that lands on the scene words, per layer."""
    model.eval()
    model.set_attn_implementation("eager")
    ids, _, spans = sets["pope"]
    att = model(input_ids=ids, output_attentions=True).attentions
    q = torch.tensor([sp[0][1] - 1 for sp in spans])
    prof = []
    for a in att:  # (B, H, L, L)
        rows = a[torch.arange(len(q)), :, q]  # (B, H, L)
        prof.append(round(float(rows[..., 1 : 1 + scene_len].sum(-1).mean()), 3))
    model.set_attn_implementation("sdpa")
    model.train()
    return prof


def main(argv: list[str] | None = None):
    a = args_(argv)
    torch.set_num_threads(1)
    weights = {f: float(f != "probe") for f in FAMILIES}
    for kv in filter(None, a.weights.split(",")):
        k, v = kv.split("=")
        weights[k] = float(v)
    world = World(a.grid, weights=weights, form=a.form)
    pope_world = World(a.grid, weights={"pope": 1.0}, form=a.form)
    sets = eval_set(World(a.grid, form=a.form), a.seed, a.eval_n)
    model = build(a)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    )
    rng = np.random.default_rng(a.seed)
    Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(a.log_dir) / f"{a.name}.jsonl", "w")
    log.write(json.dumps({"args": vars(a), "params": sum(p.numel() for p in model.parameters())}) + "\n")
    t0, c0, step, losses = time.time(), time.process_time(), 0, []
    ncell = a.grid * a.grid
    while True:
        if step % a.eval_every == 0 or time.time() - t0 > a.minutes * 60 or step >= a.steps:
            rec = {"step": step, "wall": round(time.time() - t0, 1), "cpu": round(time.process_time() - c0, 1), "loss": round(float(np.mean(losses[-a.eval_every:])), 4) if losses else None}
            rec.update(evaluate(model, sets))
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if time.time() - t0 > a.minutes * 60 or step >= a.steps:
                break
        maxf = None
        if a.curriculum and step < a.curriculum:
            maxf = 1 + int((ncell - 1) * step / a.curriculum)
        w = pope_world if step < a.fam_curriculum else world
        ids, lab, _ = batch(w, rng, a.batch, a.turns, max_filled=maxf)
        if a.lm_loss:
            lab = ids.masked_fill(ids == PAD, -100)
        loss = model(input_ids=ids, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
    scene_len = len(world.scene_words([0] * ncell))
    prof = attention_profile(model, sets, scene_len)
    log.write(json.dumps({"attention_on_scene": prof}) + "\n")
    print("attention on scene per layer", prof)
    if a.save:
        torch.save({"args": vars(a), "state": model.state_dict()}, a.save)


if __name__ == "__main__":
    main()
