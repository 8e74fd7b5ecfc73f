"""generate() is correct in every mode: it equals a hand-written greedy loop over full forwards.

These use use_cache=False (full recompute each step, the paper's decode); the routed KV cache is
checked against this path in test_routed_cache.py."""
from __future__ import annotations

import pytest
import torch
from tiny import PAD, left_pad, pixels, prompt, tiny_llava

from dpvr import DPVRConfig, convert

MODES = [
    DPVRConfig(mode="vanilla"),
    DPVRConfig(mode="lf", split_layer=2, fusion_layers=1),
    DPVRConfig(mode="lf", split_layer=2, fusion_layers=0),
    DPVRConfig(mode="pc", split_layer=2),
    DPVRConfig(mode="kv", split_layer=2),
    DPVRConfig(mode="vtw", split_layer=2),
    DPVRConfig(mode="fastv", fastv_layer=1),
]


@torch.no_grad()
def greedy_by_hand(model, ids, px, new_tokens):
    for _ in range(new_tokens):
        nxt = model(input_ids=ids, pixel_values=px).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@torch.no_grad()
@pytest.mark.parametrize("cfg", MODES, ids=lambda c: f"{c.mode}-K{c.fusion_layers}")
def test_generate_equals_greedy_recompute(cfg):
    model = convert(tiny_llava(), cfg)
    model.generation_config.pad_token_id = PAD
    ids, px = torch.tensor([prompt(3, 4)]), pixels(1)
    want = greedy_by_hand(model, ids, px, 6)
    got = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(got, want), f"{cfg.mode}: generate {got[0, -6:].tolist()} vs by hand {want[0, -6:].tolist()}"


@torch.no_grad()
@pytest.mark.parametrize("cfg", MODES[1:], ids=lambda c: f"{c.mode}-K{c.fusion_layers}")
def test_batched_generation_equals_single(cfg):
    model = convert(tiny_llava(), cfg)
    model.generation_config.pad_token_id = PAD
    rows = [prompt(3, 4, seed=1), prompt(1, 9, seed=2)]
    ids, mask = left_pad(rows)
    px = pixels(2, seed=3)
    kw = dict(max_new_tokens=5, do_sample=False, use_cache=False)
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kw)
    for b, row in enumerate(rows):
        single = model.generate(input_ids=torch.tensor([row]), pixel_values=px[b : b + 1], **kw)
        assert batched[b, -5:].tolist() == single[0, -5:].tolist(), f"{cfg.mode} row {b}"
