"""Sparse fusion (`fusion_at`): the side-branch image states come back at chosen deep layers instead of
the last K. Exact against the naive reference (which runs every fusion layer in full over the whole
sequence); batched, sdpa and cached generation agree; bad layer lists are refused by name."""
from __future__ import annotations

import pytest
import torch
from reference import reference_logits
from test_routed_cache import assert_same_generation, generate, model_for
from test_routing_equivalence import assert_text_close, converted
from tiny import IMAGE_TOKEN, left_pad, pixels, prompt, tiny_llava

from dpvr import DPVRConfig, DPVRError, convert

SPARSE = [
    DPVRConfig(mode="lf", split_layer=2, fusion_at=(3,)),  # one layer mid-stack, text-only layers after it
    DPVRConfig(mode="lf", split_layer=1, fusion_at=(2, 3, 5)),  # a run of two, then the last layer
    DPVRConfig(mode="lf", split_layer=2, fusion_at=(2, 4), side_depth=2),  # right at the split
]
IDS = lambda c: "at" + "-".join(map(str, c.fusion_at))  # noqa: E731


@torch.no_grad()
@pytest.mark.parametrize("cfg", SPARSE, ids=IDS)
def test_sparse_fusion_equals_reference_and_differs_from_last_k(cfg):
    model = converted(cfg)
    ids, px = torch.tensor([prompt(3, 7, n_images=2)]), pixels(2)
    got = model(input_ids=ids, pixel_values=px).logits
    assert_text_close(got, reference_logits(model, model.side_branch, cfg, ids, px), ids, 1e-4, f"{IDS(cfg)} vs reference")
    with model.routing(fusion_at=(), fusion_layers=len(cfg.fusion_at)):  # the same count, at the end
        last_k = model(input_ids=ids, pixel_values=px).logits
    assert (got - last_k)[ids != IMAGE_TOKEN].abs().max() > 1e-3, "fusion_at gave last-K fusion's logits"


@torch.no_grad()
def test_fusion_at_the_last_k_layers_is_lf():
    lf = converted(DPVRConfig(mode="lf", split_layer=2, fusion_layers=2))
    ids, px = torch.tensor([prompt(3, 5)]), pixels(1)
    want = lf(input_ids=ids, pixel_values=px).logits
    with lf.routing(fusion_at=(4, 5)):
        got = lf(input_ids=ids, pixel_values=px).logits
    assert_text_close(got, want, ids, 0.0, "fusion_at=(4, 5) vs K=2")


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sparse_fusion_left_padded_batch_equals_reference(attn):
    cfg = SPARSE[1]
    model = converted(cfg, attn=attn)
    ids, mask = left_pad([prompt(2, 9, n_images=1, seed=1), prompt(5, 3, n_images=2, seed=2), prompt(7, 1, n_images=0, seed=3)])
    px = pixels(3, seed=4)
    got = model(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    ref_model = converted(cfg, attn="eager")
    want = reference_logits(ref_model, ref_model.side_branch, cfg, ids, px, mask)
    assert_text_close(got, want, ids.masked_fill(mask == 0, IMAGE_TOKEN), 1e-4, f"{attn} batch vs reference")


@torch.no_grad()
@pytest.mark.parametrize("cfg", SPARSE[:2], ids=IDS)
def test_sparse_fusion_cached_generation_equals_recompute(cfg):
    model = model_for(cfg)
    ids, mask = left_pad([prompt(3, 4, seed=1), prompt(1, 9, n_images=2, seed=2)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(3, seed=4))
    assert_same_generation(generate(model, True, **inputs), generate(model, False, **inputs), IDS(cfg))
    # one image per row here: generate() expands pixel_values per image, not per row, so beams of a
    # row with two images would pair with other rows' images (the stock class does the same)
    ids, mask = left_pad([prompt(3, 4, seed=1), prompt(1, 7, seed=2)])
    short = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2), max_new_tokens=8)
    beams = [model.generate(**short, num_beams=3, do_sample=False, use_cache=c) for c in (True, False)]
    assert torch.equal(beams[0], beams[1]), "beam search cached vs recompute"
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        samples.append(model.generate(**short, do_sample=True, top_k=0, use_cache=use_cache))
    assert torch.equal(samples[0], samples[1]), "sampling cached vs recompute"


def test_fusion_at_is_normalised_and_bad_values_refused():
    cfg = DPVRConfig(mode="lf", split_layer=2, fusion_at=[5, 3])
    assert cfg.fusion_at == (3, 5) and cfg.fusion_layers == 2
    assert DPVRConfig(mode="lf", fusion_at=(3, 5), fusion_layers=4).fusion_layers == 2  # derived: their count
    assert DPVRConfig.from_dict(cfg.to_dict()) == cfg
    for bad, match in [
        (dict(mode="pc", fusion_at=(3,)), "applies to mode 'lf'"),
        (dict(fusion_at=(3, 3)), "names a layer twice"),
        (dict(fusion_at=(3, -1)), "non-negative ints"),
        (dict(fusion_at=3), "sequence of layer indices"),
    ]:
        with pytest.raises(DPVRError, match=match):
            DPVRConfig(**bad)
    with pytest.raises(DPVRError, match=r"fusion_at=\(1, 4\) out of range: layers \[1\]"):
        convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=2, fusion_at=(1, 4)))
    with pytest.raises(DPVRError, match=r"layers \[6\] are not deep"):
        convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=2, fusion_at=(6,)))


def test_analyze_suggests_fusion_at_from_the_masking_curve():
    """Deep layers where blocking text-to-image attention alone costs likelihood (beyond one standard
    error, and at least half the worst such cost) are suggested, at most three, next to the split."""
    from test_analysis_cli import paper_like_curves

    from dpvr.analysis.report import format_table
    from dpvr.analysis.summary import recommend_split

    c = paper_like_curves()  # split 18 of 32
    L = c["num_layers"]
    dll = [-0.01] * L
    dll[5], dll[21], dll[28], dll[30], dll[25] = -0.9, -0.40, -0.35, -0.12, -0.30  # 5 is before the split
    c.update({k: [0.5] * L for k in ("cos_image", "cos_text", "mass_max_head", "kl_text")})
    c.update(dll_only=dll, dll_only_sem=[0.05] * L, dll_onward=[0.0] * L, dll_onward_sem=[0.0] * L,
             acc_only=[1.0] * L, acc_onward=[1.0] * L, ll_base=-1.0, acc_base=1.0, n_masking=4)  # fmt: skip
    rec = recommend_split(c)
    assert rec.split == 18 and rec.fusion_at == (21, 25, 28), rec.fusion_reason  # 30's 0.12 < half of 0.40
    assert "fusion_at 21,25,28" in rec.fusion_reason
    c["dll_only_sem"] = [0.5] * L  # every cost within noise: no suggestion, said so
    rec = recommend_split(c)
    assert rec.fusion_at == () and "beyond noise" in rec.fusion_reason
    assert "suggested fusion_at = (none)" in format_table(c, rec)
    assert recommend_split(paper_like_curves()).fusion_reason.startswith("no masking analysis")


def test_routing_switches_away_from_a_sparse_placement():
    """`model.routing(mode=...)` / `routing(fusion_layers=K)` on a fusion_at model: the placement does not
    leak into a mode it does not apply to, and an explicit K means the last K layers."""
    from dpvr import DPVRConfig, convert
    from tiny import tiny_llava

    model = convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=2, fusion_at=(3,)))
    with model.routing(mode="vanilla"):
        assert model.dpvr_config.mode == "vanilla" and model.dpvr_config.fusion_at == ()
    with model.routing(fusion_layers=0):
        assert model.dpvr_config.is_lf_ideal
    with model.routing(fusion_layers=2):
        assert model.dpvr_config.fusion_at == () and model.dpvr_config.fusion_layers == 2
    assert model.dpvr_config.fusion_at == (3,)
