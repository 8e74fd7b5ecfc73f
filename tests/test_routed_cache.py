"""The routed KV cache: cached generation equals full-recompute generation in every routed mode."""
from __future__ import annotations

import pytest
import torch
from tiny import IMAGE_TOKEN, PAD, left_pad, pixels, prompt, tiny_llava
from transformers import DynamicCache

from dpvr import DPVRConfig, DPVRError, convert
from dpvr.routing.cache import RoutedCache

CACHED_MODES = [
    DPVRConfig(mode="lf", split_layer=2, fusion_layers=1),
    DPVRConfig(mode="lf", split_layer=2, fusion_layers=2, side_depth=2),
    DPVRConfig(mode="lf", split_layer=3, fusion_layers=0),
    DPVRConfig(mode="pc", split_layer=2),
    DPVRConfig(mode="kv", split_layer=3),
    DPVRConfig(mode="vtw", split_layer=2),
]
IDS = lambda c: f"{c.mode}-s{c.split_layer}-K{c.fusion_layers}"  # noqa: E731


def model_for(cfg, attn="eager"):
    model = convert(tiny_llava(attn=attn), cfg)
    model.generation_config.pad_token_id = PAD
    model.generation_config.suppress_tokens = [IMAGE_TOKEN]  # random weights may emit it; decoding refuses it
    if model.side_branch is not None:
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.side_branch.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def generate(model, use_cache, n=32, **kw):
    return model.generate(
        max_new_tokens=n, do_sample=False, use_cache=use_cache, return_dict_in_generate=True, output_logits=True, **kw
    )


def assert_same_generation(a, b, what):
    assert torch.equal(a.sequences, b.sequences), f"{what}: tokens differ\n{a.sequences}\n{b.sequences}"
    diff = max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))
    assert diff <= 1e-4, f"{what}: max |logit diff| over the generated steps = {diff:.3e}"


@torch.no_grad()
@pytest.mark.parametrize("cfg", CACHED_MODES, ids=IDS)
def test_cached_equals_recompute_single(cfg):
    model = model_for(cfg)
    inputs = dict(input_ids=torch.tensor([prompt(3, 4, n_images=2)]), pixel_values=pixels(2))
    assert_same_generation(generate(model, True, **inputs), generate(model, False, **inputs), IDS(cfg))


@torch.no_grad()
@pytest.mark.parametrize("cfg", CACHED_MODES, ids=IDS)
def test_cached_equals_recompute_left_padded_batch(cfg):
    model = model_for(cfg)
    ids, mask = left_pad([prompt(3, 4, seed=1), prompt(1, 9, n_images=2, seed=2), prompt(6, 1, seed=3)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(4, seed=4))
    assert_same_generation(generate(model, True, **inputs), generate(model, False, **inputs), IDS(cfg) + " batch")


@torch.no_grad()
@pytest.mark.parametrize("cfg", CACHED_MODES[:1] + CACHED_MODES[3:5], ids=IDS)
def test_cached_decode_sdpa_equals_eager(cfg):
    inputs = dict(input_ids=torch.tensor([prompt(3, 4)]), pixel_values=pixels(1))
    a = generate(model_for(cfg, "sdpa"), True, n=12, **inputs)
    b = generate(model_for(cfg, "eager"), True, n=12, **inputs)
    assert_same_generation(a, b, IDS(cfg) + " sdpa vs eager")


@torch.no_grad()
@pytest.mark.parametrize("cfg", CACHED_MODES[:1] + CACHED_MODES[4:5], ids=IDS)
def test_beam_search_and_sampling_with_cache(cfg):
    model = model_for(cfg)
    ids, mask = left_pad([prompt(3, 4, seed=1), prompt(1, 7, seed=2)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2), max_new_tokens=8)
    beams = [model.generate(**inputs, num_beams=3, do_sample=False, use_cache=c) for c in (True, False)]
    assert torch.equal(beams[0], beams[1]), f"beam search cached vs recompute:\n{beams[0]}\n{beams[1]}"
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        samples.append(model.generate(**inputs, do_sample=True, top_k=0, temperature=1.0, use_cache=use_cache))
    assert torch.equal(samples[0], samples[1]), f"sampling cached vs recompute:\n{samples[0]}\n{samples[1]}"


@torch.no_grad()
def test_each_layer_caches_its_own_token_set():
    cfg = DPVRConfig(mode="lf", split_layer=2, fusion_layers=1)
    model = model_for(cfg)
    ids = torch.tensor([prompt(3, 5)])
    out = model(input_ids=ids, pixel_values=pixels(1), use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, RoutedCache)
    T, n_text = ids.shape[1], int((ids != IMAGE_TOKEN).sum())
    assert cache.lengths() == [T, T, n_text, n_text, n_text, T], cache.lengths()
    vanilla = convert(tiny_llava(), DPVRConfig(mode="vanilla"))(input_ids=ids, pixel_values=pixels(1), use_cache=True)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in vanilla.past_key_values.layers)
    assert cache.nbytes() == full_bytes * (3 * T + 3 * n_text) // (6 * T)


@torch.no_grad()
def test_cache_misuse_is_refused():
    model = model_for(CACHED_MODES[0])
    ids, px = torch.tensor([prompt(3, 4)]), pixels(1)
    cache = model(input_ids=ids, pixel_values=px, use_cache=True).past_key_values
    with pytest.raises(DPVRError, match="image input after the prompt"):
        model(input_ids=torch.tensor([[IMAGE_TOKEN]]), pixel_values=px, past_key_values=cache)
    with pytest.raises(DPVRError, match="batch 1 but the input has batch 2"):
        model(input_ids=torch.tensor([[7], [8]]), past_key_values=cache)
    other = model_for(CACHED_MODES[3])
    with pytest.raises(DPVRError, match="filled under routing"):
        other(input_ids=torch.tensor([[7]]), past_key_values=cache)
    stock = DynamicCache(config=model.config.text_config)
    stock.update(torch.zeros(1, 2, 3, 12), torch.zeros(1, 2, 3, 12), 0)
    with pytest.raises(DPVRError, match="RoutedCache"):
        model.generate(input_ids=ids, pixel_values=px, past_key_values=stock, max_new_tokens=2)


@torch.no_grad()
def test_fastv_prunes_once_at_prefill():
    """With a cache, FastV ranks image tokens once, by the prompt's last token (as FastV's own
    inference does); later layers cache only the kept tokens."""
    cfg = DPVRConfig(mode="fastv", fastv_layer=1, fastv_ratio=0.5)
    model = model_for(cfg)
    ids = torch.tensor([prompt(3, 5, n_images=2)])
    out = model(input_ids=ids, pixel_values=pixels(2), use_cache=True)
    T, n_img = ids.shape[1], int((ids == IMAGE_TOKEN).sum())
    kept = T - n_img // 2
    assert out.past_key_values.lengths() == [T, T] + [kept] * 4, out.past_key_values.lengths()
    step = model(input_ids=torch.tensor([[9]]), past_key_values=out.past_key_values)
    assert out.past_key_values.lengths() == [T + 1, T + 1] + [kept + 1] * 4
    assert step.logits.isfinite().all()


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 3, 5])
def test_nan_while_decoding_names_the_layer(layer):
    from dpvr import NonFiniteError

    model = model_for(CACHED_MODES[0])
    cache = model(input_ids=torch.tensor([prompt(3, 4)]), pixel_values=pixels(1), use_cache=True).past_key_values
    with torch.no_grad():
        model.model.language_model.layers[layer].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=f"^layer {layer} produced NaN/inf while decoding"):
        model(input_ids=torch.tensor([[9]]), past_key_values=cache)
