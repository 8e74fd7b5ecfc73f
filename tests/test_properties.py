"""Property-based tests of the routing core: random small configs and batches, drawn by Hypothesis,
against the naive reference (tests/reference.py), the stock model, and full recompute.

Drawn: backbone (Llama/Mistral/Qwen2), depth, eager/sdpa, mode, split, fusion layers, side depth,
FastV layer and ratio, FastV in the shared layers, a batch of 1-3 rows with 0-2 images each at
random places, left-padded to the longest. Profiles (env HYPOTHESIS_PROFILE):
    dpvr (default)  a fixed (derandomized) set of examples, well under 2 minutes in the suite
    deep            random examples, many more of them: `HYPOTHESIS_PROFILE=deep python3 run.py test tests/test_properties.py`
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import reference_logits
from tiny import IMAGE_TOKEN, N_IMG, PAD, VOCAB, left_pad, pixels, tiny_llava

from dpvr import DPVRConfig, convert
from dpvr.errors import DPVRError

_COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dpvr", max_examples=12, derandomize=True, **_COMMON)
settings.register_profile("deep", max_examples=300, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dpvr"))


@st.composite
def routings(draw, layers: int) -> DPVRConfig:
    mode = draw(st.sampled_from(["lf", "pc", "kv", "vtw", "fastv"]))
    if mode == "fastv":
        return DPVRConfig(mode="fastv", fastv_layer=draw(st.integers(0, layers - 2)),
                          fastv_ratio=draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])))  # fmt: skip
    s = draw(st.integers(1, layers - 1))
    shallow = draw(st.booleans())
    return DPVRConfig(
        mode=mode, split_layer=s, fusion_layers=draw(st.integers(0, layers - s)),
        side_depth=draw(st.integers(1, min(2, layers - s))), shallow_fastv=shallow,
        fastv_layer=draw(st.integers(0, s - 1)) if shallow else 2, fastv_ratio=draw(st.sampled_from([0.25, 0.5])),
    )  # fmt: skip


@st.composite
def rows(draw, with_images: bool = True):
    """1-3 prompts: text, image spans separated by text, text; ids avoid the pad and image ids."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        text = lambda lo, hi: draw(st.lists(st.integers(6, VOCAB - 1), min_size=lo, max_size=hi))  # noqa: E731
        ids = text(0, 4)
        n_img = draw(st.integers(0, 2)) if with_images else 0
        for i in range(n_img):
            ids += [IMAGE_TOKEN] * N_IMG + (text(1, 2) if i < n_img - 1 else [])
        out.append((ids + text(1, 4), n_img))
    return out


@st.composite
def cases(draw):
    layers = draw(st.integers(3, 6))
    return dict(backbone=draw(st.sampled_from(["llama", "mistral", "qwen2"])), layers=layers,
                attn=draw(st.sampled_from(["eager", "sdpa"])), cfg=draw(routings(layers)), rows=draw(rows()),
                seed=draw(st.integers(0, 2**16)))  # fmt: skip


def build(case):
    """(routed model under test, its eager twin with the same weights for the reference, inputs)."""
    base = tiny_llava(case["backbone"], case["layers"], case["attn"], seed=case["seed"])
    model = convert(base, case["cfg"])
    if model.side_branch is not None:  # a copied side branch equals its layer: perturb it
        g = torch.Generator().manual_seed(case["seed"])
        with torch.no_grad():
            for p in model.side_branch.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    twin = convert(tiny_llava(case["backbone"], case["layers"], "eager", seed=case["seed"]), case["cfg"])
    twin.load_state_dict(model.state_dict())
    ids, mask = left_pad([r for r, _ in case["rows"]])
    n_images = sum(n for _, n in case["rows"])
    px = pixels(n_images, seed=case["seed"]) if n_images else None
    return model, twin, ids, mask, px


def text_diff(got, want, ids, mask) -> float:
    keep = mask.bool() & (ids != IMAGE_TOKEN)  # only valid text positions are part of the contract
    return (got - want)[keep].abs().max().item()


@PROFILE
@given(case=cases())
@torch.no_grad()
def test_random_routing_equals_the_naive_reference(case):
    model, twin, ids, mask, px = build(case)
    got = model(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    want = reference_logits(twin, twin.side_branch, case["cfg"], ids, px, mask)
    assert text_diff(got, want, ids, mask) <= 1e-4, f"{case['cfg']} on {case['backbone']}/{case['attn']}"


@PROFILE
@given(case=cases(), text=rows(with_images=False))
@torch.no_grad()
def test_random_routing_on_text_only_batches_is_the_stock_model(case, text):
    model, _, _, _, _ = build(case)
    ids, mask = left_pad([r for r, _ in text])
    stock = tiny_llava(case["backbone"], case["layers"], case["attn"], seed=case["seed"])
    got = model(input_ids=ids, attention_mask=mask).logits
    assert text_diff(got, stock(input_ids=ids, attention_mask=mask).logits, ids, mask) <= 1e-5


@PROFILE
@given(case=cases())
@torch.no_grad()
def test_cached_generation_equals_recomputing_the_whole_sequence(case):
    """Each cached decode step's logits equal a full forward over the generated sequence. (FastV with a
    cache ranks once at prefill, by design, so it is held to this for its first token only.)"""
    model, _, ids, mask, px = build(case)
    new = 1 if case["cfg"].mode == "fastv" or case["cfg"].shallow_fastv else 3
    try:
        out = model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=PAD, suppress_tokens=[IMAGE_TOKEN], output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
    except DPVRError as exc:  # only refusal allowed: none is expected for these inputs
        pytest.fail(f"{case['cfg']}: {exc}")
    seq = out.sequences
    assume(seq.shape[1] == ids.shape[1] + new)  # no early eos
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], 1)
    full = model(input_ids=seq[:, :-1], pixel_values=px, attention_mask=full_mask[:, :-1], use_cache=False).logits
    T = ids.shape[1]
    for k, step in enumerate(out.logits):
        diff = (step - full[:, T - 1 + k]).abs().max().item()
        assert diff <= 1e-4, f"{case['cfg']}: decode step {k} differs from recompute by {diff:.2e}"
