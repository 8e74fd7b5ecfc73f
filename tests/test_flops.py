"""The analytic FLOP model equals torch's FlopCounterMode on real forwards, mode by mode."""
from __future__ import annotations

import pytest
import torch
from families import FAMILIES, IMAGE, QWEN, SIZES, sample, tiny_vlm
from tiny import N_IMG, pixels, prompt, tiny_llava
from torch.utils.flop_counter import FlopCounterMode

from dpvr import DPVRConfig, convert
from dpvr.bench.flops import forward_flops
from dpvr.bench.presets import preset_config
from dpvr.bench.vision_flops import image_tokens, vision_flops

CASES = [
    ("vanilla", {}),
    ("lf", dict(split_layer=2, fusion_layers=1)),
    ("lf", dict(split_layer=2, fusion_layers=2, side_depth=2)),
    ("lf-ideal", dict(split_layer=3, fusion_layers=0)),
    ("pc", dict(split_layer=2)),
    ("kv", dict(split_layer=3)),
    ("vtw", dict(split_layer=2)),
    ("fastv", dict(fastv_layer=1, fastv_ratio=0.5)),
    # beyond the paper: FastV pruning inside the shared layers, composed with each split mode
    ("lf", dict(split_layer=3, fusion_layers=1, shallow_fastv=True, fastv_layer=1, fastv_ratio=0.5)),
    ("pc", dict(split_layer=3, shallow_fastv=True, fastv_layer=0, fastv_ratio=0.75)),
    ("kv", dict(split_layer=2, shallow_fastv=True, fastv_layer=1, fastv_ratio=0.5)),
    ("vtw", dict(split_layer=3, shallow_fastv=True, fastv_layer=1, fastv_ratio=0.5)),
]


def counted(model, **inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("mode,kw", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_analytic_flops_match_flop_counter(mode, kw):
    # eager attention: torch 2.13's FlopCounterMode does not see the CPU flash kernel sdpa dispatches
    # to (it counts zero attention FLOPs there), while eager's matmuls are counted like any other
    attn = "eager"
    cfg = DPVRConfig(mode="lf" if mode == "lf-ideal" else mode, **kw)
    model = convert(tiny_llava(attn=attn), cfg)
    pre, post = 3, 9
    ids = torch.tensor([prompt(pre, post)])
    got = counted(model, input_ids=ids, pixel_values=pixels(1))
    want = forward_flops(
        model.config, mode, cfg.split_layer, cfg.fusion_layers, cfg.side_depth, n_img=N_IMG, n_txt=pre + post,
        fastv_layer=cfg.fastv_layer, fastv_ratio=cfg.fastv_ratio, shallow_fastv=cfg.shallow_fastv,
    )["total"]  # fmt: skip
    assert abs(got - want) <= 0.02 * want, f"{mode} {attn}: counted {got} vs analytic {want} ({got / want - 1:+.2%})"


def test_batch_and_logits_to_keep_scale_as_modelled():
    model = convert(tiny_llava(attn="eager"), DPVRConfig(mode="lf", split_layer=2))
    ids = torch.tensor([prompt(3, 9)] * 2)
    got = counted(model, input_ids=ids, pixel_values=pixels(2), logits_to_keep=1)
    want = forward_flops(model.config, "lf", 2, 1, 1, n_img=N_IMG, n_txt=12, batch=2, logits_tokens=1)["total"]
    assert abs(got - want) <= 0.02 * want, f"counted {got} vs analytic {want}"


def test_llava_7b_lf_saving_is_in_the_papers_range():
    """The paper: 25-30% fewer forward FLOPs for DPVR-LF at 7B (s=18, K=1, D=1, 576 image tokens)."""
    cfg = preset_config("llava-1.5-7b")
    savings = []
    for n_txt in (64, 128):  # typical instruction lengths; the saving shrinks as text grows (24.9% at 256)
        van = forward_flops(cfg, "vanilla", 18, n_txt=n_txt)["total"]
        lf = forward_flops(cfg, "lf", 18, 1, 1, n_txt=n_txt)["total"]
        savings.append(1 - lf / van)
    assert all(0.25 <= s <= 0.35 for s in savings), savings


FAMILY_MODES = {"vanilla": {}, "lf": dict(split_layer=2), "lf-ideal": dict(split_layer=3, fusion_layers=0),
                "kv": dict(split_layer=3, side_depth=2), "vtw": dict(split_layer=2),
                "fastv": dict(fastv_layer=1, fastv_ratio=0.5), "sparse": dict(split_layer=1, fusion_at=(2, 3, 5))}  # fmt: skip


@pytest.mark.parametrize("mode", FAMILY_MODES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("images", [[0], [1, 2]], ids=["one-image", "two-images"])
def test_analytic_flops_match_flop_counter_for_every_family(family, mode, images):
    """Vision towers (anyres tiles, Qwen2.5-VL's windows) and the routed language model, counted."""
    kw = FAMILY_MODES[mode]
    cfg = DPVRConfig(mode="lf" if mode in ("lf-ideal", "sparse") else mode, **kw)
    model = convert(tiny_vlm(family, 6, "eager"), cfg)
    _, (inputs,) = sample(family, model, [(3, images, 5)])
    n_img = int((inputs["input_ids"] == IMAGE).sum())
    n_txt = inputs["input_ids"].shape[1] - n_img
    sizes = [SIZES["qwen" if family in QWEN else "anyres"][i] for i in images]
    assert image_tokens(model.config, sizes) == n_img, "image-token count of the analytic model vs the prompt's"
    got = counted(model, **inputs)
    want = forward_flops(model.config, "lf" if mode == "sparse" else mode, cfg.split_layer, cfg.fusion_layers,
                         cfg.side_depth, n_txt=n_txt, images=sizes, fastv_layer=cfg.fastv_layer,
                         fastv_ratio=cfg.fastv_ratio, fusion_at=cfg.fusion_at)["total"]  # fmt: skip
    assert abs(got - want) <= 0.02 * want, f"{family} {mode}: counted {got} vs analytic {want} ({got / want - 1:+.2%})"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("images", [[0], [1, 2], [2, 2, 1]], ids=["one-image", "two-images", "three-images"])
def test_vision_flops_are_exact_for_every_family(family, images):
    model = tiny_vlm(family, 2, "eager")
    _, (inputs,) = sample(family, model, [(1, images, 1)])
    vision = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
    if family == "llava_onevision":
        vision["batch_num_images"] = inputs["batch_num_images"]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.get_image_features(**vision)
    sizes = [SIZES["qwen" if family in QWEN else "anyres"][i] for i in images]
    assert counter.get_total_flops() == vision_flops(model.config, sizes)
