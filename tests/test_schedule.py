"""One schedule per mode: the executor, the FLOP model and the routed cache all follow it.

Every mode is walked through the executor (its stages, FLOPs counted by torch's FlopCounterMode, the
keys/values each layer leaves in the RoutedCache) and through the analytic FLOP model, so the two
cannot disagree on what a mode runs.
"""
from __future__ import annotations

import pytest
import torch
from tiny import IMAGE_TOKEN, N_IMG, pixels, prompt, tiny_llava
from torch.utils.flop_counter import FlopCounterMode

from dpvr import MODES, DPVRConfig, convert
from dpvr.bench.flops import forward_flops
from dpvr.loading import describe
from dpvr.routing import forward
from dpvr.routing.cache import RoutedCache
from dpvr.routing.schedule import ALL, TEXT, Span, compile_schedule, layer_contents, summary

L = 6
CASES = [
    DPVRConfig(mode="vanilla"),
    DPVRConfig(mode="lf", split_layer=2, fusion_layers=1),
    DPVRConfig(mode="lf", split_layer=2, fusion_layers=2, side_depth=2),
    DPVRConfig(mode="lf", split_layer=3, fusion_layers=0),
    DPVRConfig(mode="lf", split_layer=2, fusion_at=(3,)),  # sparse fusion: one layer, mid-stack
    DPVRConfig(mode="lf", split_layer=1, fusion_at=(2, 3, 5)),  # a run of two, then the last layer
    DPVRConfig(mode="pc", split_layer=3),
    DPVRConfig(mode="kv", split_layer=3, side_depth=2),
    DPVRConfig(mode="vtw", split_layer=2),
    DPVRConfig(mode="fastv", fastv_layer=1, fastv_ratio=0.5),
    DPVRConfig(mode="fastv", fastv_layer=0, fastv_ratio=0.75),
    DPVRConfig(mode="lf", split_layer=3, shallow_fastv=True, fastv_layer=1),
    DPVRConfig(mode="pc", split_layer=3, shallow_fastv=True, fastv_layer=0, fastv_ratio=0.75),
    DPVRConfig(mode="kv", split_layer=2, shallow_fastv=True, fastv_layer=1),
    DPVRConfig(mode="vtw", split_layer=3, shallow_fastv=True, fastv_layer=1),
]
IDS = lambda c: describe_cfg(c)  # noqa: E731


def describe_cfg(c: DPVRConfig) -> str:
    return f"{c.mode}-s{c.split_layer}-K{c.fusion_layers}-at{''.join(map(str, c.fusion_at))}-fv{int(c.shallow_fastv)}{c.fastv_layer}"


def test_every_mode_is_walked():
    assert {c.mode for c in CASES} == set(MODES)


def _model(cfg):
    return convert(tiny_llava(attn="eager", layers=L), cfg)


@torch.no_grad()
@pytest.mark.parametrize("cfg", CASES, ids=IDS)
def test_executor_runs_the_schedule_and_flops_match(cfg):
    """The executor's stages are the schedule's steps, in order; its FlopCounterMode count is the
    analytic model's (within 2%: the model leaves out norms and elementwise work)."""
    model = _model(cfg)
    ids = torch.tensor([prompt(3, 9)])
    stages, depth = [], [0]

    def hook(name, layers):
        class Stage:
            def __enter__(self):
                if depth[0] == 0:
                    stages.append(layers)
                depth[0] += 1

            def __exit__(self, *exc):
                depth[0] -= 1

        return Stage()

    with forward.observe_stages(hook), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, pixel_values=pixels(1))
    steps = compile_schedule(cfg, L)
    # vanilla is the stock forward itself (no routed stage); its schedule is what the stock model runs
    want_stages = [] if cfg.mode == "vanilla" else [None if s.side else s.layers for s in steps]
    assert stages == want_stages, (stages, summary(steps))
    got = counter.get_total_flops()
    want = forward_flops(
        model.config, cfg.mode, cfg.split_layer, cfg.fusion_layers, cfg.side_depth, n_img=N_IMG, n_txt=12,
        fastv_layer=cfg.fastv_layer, fastv_ratio=cfg.fastv_ratio, shallow_fastv=cfg.shallow_fastv,
        fusion_at=cfg.fusion_at,
    )["total"]  # fmt: skip
    assert abs(got - want) <= 0.02 * want, f"counted {got} vs analytic {want} ({got / want - 1:+.2%})"


@torch.no_grad()
@pytest.mark.parametrize("cfg", [c for c in CASES if c.mode != "vanilla"], ids=IDS)
def test_cache_holds_what_the_schedule_says(cfg):
    """Per layer, the routed cache's keys cover exactly the schedule's token set: every token, text only,
    or (after FastV pruning) text plus the kept image tokens."""
    model = _model(cfg)
    pre, post = 3, 9
    ids = torch.tensor([prompt(pre, post)])
    cache = RoutedCache(L, cfg)
    model(input_ids=ids, pixel_values=pixels(1), past_key_values=cache, use_cache=True)
    positions = torch.arange(ids.shape[1])
    text = set(positions[ids[0] != IMAGE_TOKEN].tolist())
    image = set(positions[ids[0] == IMAGE_TOKEN].tolist())
    kept_images = N_IMG - int(N_IMG * cfg.fastv_ratio)
    for i, (keys, pruned) in enumerate(layer_contents(compile_schedule(cfg, L), L)):
        kv = cache.layers[i]
        held = set(kv.order[0][kv.valid[0]].tolist())
        assert len(held) == kv.valid[0].sum(), f"layer {i} caches a position twice"
        if keys == TEXT:
            assert held == text, f"layer {i}: cached {sorted(held)}, schedule says text only"
        elif not pruned:
            assert held == text | image, f"layer {i}: cached {sorted(held)}, schedule says all tokens"
        else:
            assert text <= held and len(held & image) == kept_images, f"layer {i}: {sorted(held)} after pruning"
        assert keys in (ALL, TEXT)


def test_text_only_prompts_run_every_layer_on_every_token():
    for cfg in CASES:
        assert [(s.layers, s.queries) for s in compile_schedule(cfg, L, has_images=False)] == [(Span(0, L), ALL)]


def test_lf_schedules_read_plainly():
    assert summary(compile_schedule(DPVRConfig(mode="lf", split_layer=2, fusion_layers=2), L)) == (
        "layers 0-1 all | side x1 image | layers 2-3 text | layer 4 image<-side all | layer 5 text+image kv"
    )
    assert summary(compile_schedule(DPVRConfig(mode="lf", split_layer=1, fusion_at=(2, 3, 5)), L)) == (
        "layer 0 all | side x1 image | layer 1 text | layer 2 image<-side all | layer 3 text+image kv"
        " | layer 4 text | layer 5 image<-side text+image kv"
    )
    model = _model(DPVRConfig(mode="lf", split_layer=2, fusion_at=(3,)))
    assert describe(model) == "lf s=2 fusion_at=3 D=1"
    assert describe(model, plan=True).endswith("[layers 0-1 all | side x1 image | layer 2 text"
                                               " | layer 3 image<-side text+image kv | layers 4-5 text]")  # fmt: skip
