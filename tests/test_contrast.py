"""Contrastive attention (dpvr.contrast): off-by-construction where it must be, on where it should be,
and a cached generation equal to a full recompute, in vanilla and every routed mode."""
from __future__ import annotations

import pytest
import torch
from reference import reference_logits
from tiny import IMAGE_TOKEN, PAD, VOCAB, left_pad, pixels, prompt, tiny_llava

from dpvr import DPVRConfig, convert
from dpvr.contrast import EPS, ContrastConfig, contrast
from dpvr.errors import DPVRError

# split 2 of 6 layers: early layer 1 sees the image in every mode; layers 3-5 see image keys in vanilla,
# PC, KV and LF's fusion layer, never in VTW (withdrawn from layer 2 on)
MODES = {
    "vanilla": None,
    "lf": DPVRConfig(mode="lf", split_layer=2, fusion_layers=1),
    "pc": DPVRConfig(mode="pc", split_layer=2),
    "kv": DPVRConfig(mode="kv", split_layer=2),
    "vtw": DPVRConfig(mode="vtw", split_layer=2),
    "fastv": DPVRConfig(mode="fastv", fastv_layer=1, fastv_ratio=0.5),
}
LATE = ContrastConfig(early_layer=1, layers=(3, 4, 5), strength=1.0)


def model_in(mode: str, attn: str = "eager"):
    base = tiny_llava(attn=attn)
    model = base if MODES[mode] is None else convert(base, MODES[mode])
    model.generation_config.pad_token_id = PAD
    return model


def image_batch():
    ids, mask = left_pad([prompt(3, 4, seed=1), prompt(1, 9, seed=2)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2, seed=3))


def logits(model, cfg, **inputs) -> torch.Tensor:
    with torch.no_grad(), contrast(model, cfg):
        out = model(**inputs).logits
    return out[inputs["attention_mask"].bool()] if "attention_mask" in inputs else out


@pytest.mark.parametrize("mode", ["vanilla", "lf", "vtw"])
def test_text_only_prompt_is_stock_exactly(mode):
    model = model_in(mode, attn="sdpa")
    ids = torch.randint(6, VOCAB, (2, 11), generator=torch.Generator().manual_seed(4))
    kw = dict(input_ids=ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = model.generate(**kw)
        with contrast(model, ContrastConfig(1, (3, 4, 5), strength=3.0)):
            got = model.generate(**kw)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", list(MODES))
def test_strength_zero_is_the_mode_itself(mode, attn):
    model, inputs = model_in(mode, attn), image_batch()
    want = logits(model, None, **inputs)
    torch.testing.assert_close(logits(model, ContrastConfig(1, (3, 4, 5), 0.0), **inputs), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["vanilla", "lf", "pc", "kv", "fastv"])
def test_strength_changes_answers_where_late_layers_see_the_image(mode):
    model, inputs = model_in(mode), image_batch()
    diff = (logits(model, LATE, **inputs) - logits(model, None, **inputs)).abs().max()
    assert diff > 1e-3, f"{mode}: contrast changed the logits by {diff:.2e} only"


def test_vtw_contrasts_only_layers_that_still_see_the_image():
    model, inputs = model_in("vtw"), image_batch()
    plain = logits(model, None, **inputs)
    # layers 3-5 run after the withdrawal (split 2): no image key, nothing to re-weight
    torch.testing.assert_close(logits(model, LATE, **inputs), plain, rtol=0, atol=0)
    assert (logits(model, ContrastConfig(0, (1,), 1.0), **inputs) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["vanilla", "lf", "pc", "kv", "vtw"])  # FastV: see the test below
def test_cached_generation_equals_recompute(mode):
    model = model_in(mode, attn="sdpa")
    kw = dict(**image_batch(), max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), contrast(model, ContrastConfig(0, (2, 4, 5), strength=2.0)):
        cached, full = model.generate(**kw, use_cache=True), model.generate(**kw, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences)
    for step, (a, b) in enumerate(zip(cached.logits, full.logits)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=f"{mode} step {step}")


def test_fastv_cached_prefill_equals_a_plain_forward():
    """FastV's cache keeps the prefill's pruning while a recompute re-ranks at every step (with or without
    contrast: test_routed_cache.py), so cached != recomputed is FastV's own; what holds is that the
    cached generation's first step is the contrasted forward of the prompt."""
    model = model_in("fastv", attn="sdpa")
    inputs = image_batch()
    with torch.no_grad(), contrast(model, LATE):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=True, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
        step0 = model(**inputs).logits[:, -1]
    torch.testing.assert_close(out.logits[0], step0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["vanilla", "lf", "kv"])
def test_batched_equals_single_rows(mode):
    """Left padding: pad positions are neither queries nor keys of the statistics."""
    model = model_in(mode, attn="sdpa")
    rows, px = [prompt(3, 4, seed=1), prompt(1, 9, seed=2)], pixels(2, seed=3)
    ids, mask = left_pad(rows)
    kw = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad(), contrast(model, LATE):
        batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kw)
        for b, row in enumerate(rows):
            single = model.generate(input_ids=torch.tensor([row]), pixel_values=px[b : b + 1], **kw)
            assert batched[b, -4:].tolist() == single[0, -4:].tolist(), f"{mode} row {b}"


def test_context_restores_the_model_even_after_an_error():
    model = model_in("lf", attn="sdpa")
    with pytest.raises(DPVRError, match="input_ids"), contrast(model, LATE):
        model(inputs_embeds=torch.zeros(1, 3, 48))
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks
    assert not any(hasattr(layer.self_attn, "_dpvr_contrast") for layer in model.model.language_model.layers)


@pytest.mark.parametrize("cfg, words", [
    (ContrastConfig(1, (3,), float("nan")), "finite"),
    (ContrastConfig(1, (3,), float("inf")), "finite"),
    (ContrastConfig(1, (3,), "1"), "finite"),
    (ContrastConfig(6, (7,), 1.0), "early_layer must be in [0, 6)"),
    (ContrastConfig(-1, (3,), 1.0), "early_layer"),
    (ContrastConfig(1, (), 1.0), "at least one layer"),
    (ContrastConfig(3, (2, 4), 1.0), "[2] out of range"),
    (ContrastConfig(1, (6,), 1.0), "[6] out of range"),
    (ContrastConfig(1, (3, 3), 1.0), "twice"),
])  # fmt: skip
def test_bad_configs_refused_in_one_line(cfg, words):
    model = model_in("vanilla")
    with pytest.raises(DPVRError) as err, contrast(model, cfg):
        pass
    assert words in str(err.value) and "\n" not in str(err.value)
    assert model.config.text_config._attn_implementation == "eager"  # refused before anything was touched


@torch.no_grad()
@pytest.mark.parametrize("mode", ["vanilla", "lf"])
@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_other_families(family, mode):
    """The attention function is the families' own layers' (Qwen2-VL's mrope positions, NeXT's anyres
    tokens): strength 0 is the mode, and a cached generation equals a recompute."""
    from families import IMAGE, sample, tiny_vlm

    cfg = DPVRConfig(mode=mode, split_layer=2, fusion_layers=1)
    model = convert(tiny_vlm(family, 6, "sdpa"), cfg)
    model.generation_config.pad_token_id, model.generation_config.suppress_tokens = PAD, [IMAGE]
    batch, _ = sample(family, model, [(2, [0, 1], 3), (4, [2], 2)], seed=3)
    keep = (batch["input_ids"] != IMAGE) & batch["attention_mask"].bool()  # text positions: the contract
    want = model(**batch).logits[keep]
    with contrast(model, ContrastConfig(1, (3, 5), 0.0)):
        torch.testing.assert_close(model(**batch).logits[keep], want, rtol=0, atol=1e-6)
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with contrast(model, ContrastConfig(0, (2, 4, 5), 2.0)):
        assert (model(**batch).logits[keep] - want).abs().max() > 1e-3, f"{family} {mode}: contrast changed nothing"
        cached, full = model.generate(**batch, **kw, use_cache=True), model.generate(**batch, **kw, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences), f"{family} {mode}"
    for a, b in zip(cached.logits, full.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_blocks_do_not_nest():
    model = model_in("vanilla")
    with contrast(model, LATE), pytest.raises(DPVRError, match="do not nest"), contrast(model, LATE):
        pass
    assert model.config.text_config._attn_implementation == "eager"


def test_attention_without_a_bias_is_refused_by_name():
    model = model_in("vanilla")
    model.config.text_config._attn_implementation = "flash_attention_2"  # takes no additive bias
    with pytest.raises(DPVRError, match="not attn_implementation='flash_attention_2'"), contrast(model, LATE):
        pass


def naive_contrast(cfg: ContrastConfig, input_ids, attention_mask):
    """The formula of docs/contrastive.md over the full sequence, for reference_logits(edit=): eager
    attention weights of each watched layer, running sums by explicit cumsum, the bias added to the mask."""
    valid = attention_mask.bool()
    img, txt = (input_ids == IMAGE_TOKEN) & valid, (input_ids != IMAGE_TOKEN) & valid
    early = {}

    def log_dist(cum):
        total = cum.sum(-1, keepdim=True)
        return (cum / total.clamp_min(1e-30)).clamp_min(EPS).log(), total > 0

    def edit(i, module, h, bias, cos_sin):
        if i not in (cfg.early_layer, *cfg.layers):
            return bias
        _, w = module.self_attn(module.input_layernorm(h), position_embeddings=cos_sin, attention_mask=bias)
        cum = (w.mean(1) * img[:, None, :] * txt[:, :, None]).cumsum(1)  # (B, T queries, T keys)
        if i == cfg.early_layer:
            early["cum"] = cum
            return bias
        (late, has_late), (ref, has_ref) = log_dist(cum), log_dist(early["cum"])
        add = cfg.strength * (late - ref) * has_late * has_ref * img[:, None, :] * txt[:, :, None]
        return bias + add[:, None].to(bias.dtype)

    return edit


@torch.no_grad()
@pytest.mark.parametrize("mode", ["vanilla", "lf", "pc", "kv", "vtw"])
def test_equals_the_naive_reference(mode):
    """Routed layers' gathered token sets, the stock forward's inferred orders and left padding all meet
    the same formula computed over the full sequence with explicit masks (tests/reference.py)."""
    model, inputs = model_in(mode), image_batch()
    cfg = ContrastConfig(0, (1, 3, 5), 1.5) if mode == "vtw" else ContrastConfig(1, (3, 4, 5), 1.5)
    routing = model.dpvr_config if mode != "vanilla" else DPVRConfig(mode="vanilla")
    side = getattr(model, "side_branch", None)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    want = reference_logits(model, side, routing, **inputs, edit=naive_contrast(cfg, ids, mask))
    text = (ids != IMAGE_TOKEN)[mask.bool()]  # logits() keeps valid positions; text ones are the contract
    want = want[mask.bool()][text]
    torch.testing.assert_close(logits(model, cfg, **inputs)[text], want, rtol=0, atol=1e-4)
    assert (want - logits(model, None, **inputs)[text]).abs().max() > 1e-3, "the reference changed nothing"
