"""Every routed family beyond LLaVA-1.5 (LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) x every mode:
stock where it must be, the naive masked reference everywhere else, batched == alone, eager == sdpa,
cached generation == recompute, and each layer's cache holding what the schedule says."""
from __future__ import annotations

import pytest
import torch
from families import FAMILIES, IMAGE, QWEN, sample, tiny_vlm
from reference import reference_logits
from tiny import PAD

from dpvr import DPVRConfig, DPVRError, DPVRForConditionalGeneration, convert
from dpvr.attention import FP32_SDPA
from dpvr.routing.cache import RoutedCache
from dpvr.routing.schedule import TEXT, compile_schedule, layer_contents

L = 6
MODES = {
    "lf": DPVRConfig(mode="lf", split_layer=2, fusion_layers=1),
    "lf-K0": DPVRConfig(mode="lf", split_layer=3, fusion_layers=0),
    "pc": DPVRConfig(mode="pc", split_layer=3),
    "kv": DPVRConfig(mode="kv", split_layer=3, side_depth=2),
    "vtw": DPVRConfig(mode="vtw", split_layer=2),
    "fastv": DPVRConfig(mode="fastv", fastv_layer=1, fastv_ratio=0.5),
    "sparse": DPVRConfig(mode="lf", split_layer=1, fusion_at=(2, 3, 5)),
}
# two images of different sizes in one row, rows with different image token counts, a text-only row
ROWS = [(2, [0, 1], 3), (4, [2], 2), (3, [], 5)]
VISION = ("pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids", "batch_num_images")


def converted(family, cfg, attn="eager"):
    model = convert(tiny_vlm(family, L, attn), cfg)
    model.generation_config.pad_token_id = PAD
    model.generation_config.suppress_tokens = [IMAGE]  # random weights may emit it; decoding refuses it
    if model.side_branch is not None:  # a copied side branch equals the layer it came from: perturb it
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.side_branch.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def text_diff(got, want, ids, mask=None) -> float:
    """Max |diff| over real text positions (image and padding positions' outputs are not part of the contract)."""
    keep = (ids != IMAGE) if mask is None else (ids != IMAGE) & mask.bool()
    return (got - want)[keep].abs().max().item()


def vision(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k in VISION}


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_vanilla_equals_stock_and_text_only_prompts_are_stock_in_every_mode(family):
    stock = tiny_vlm(family, L)
    batch, singles = sample(family, stock, ROWS[:2])
    want = stock(**batch).logits
    got = converted(family, DPVRConfig(mode="vanilla"))(**batch).logits
    assert (got - want).abs().max() <= 1e-5, f"{family} vanilla vs stock"
    text_only = singles[0]["input_ids"][:, :2].clone()
    for name, cfg in MODES.items():
        got = converted(family, cfg)(input_ids=text_only).logits
        assert (got - stock(input_ids=text_only).logits).abs().max() <= 1e-5, f"{family} {name} text-only"


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_routed_equals_reference_batched_and_alone(family, mode):
    cfg = MODES[mode]
    model = converted(family, cfg)
    batch, singles = sample(family, model, ROWS)
    got = model(**batch).logits
    want = reference_logits(model, model.side_branch, cfg, **batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    diff = text_diff(got, want, ids, mask)
    assert diff <= 1e-4, f"{family} {mode} vs reference: {diff:.2e}"
    with model.routing(mode="vanilla"):
        stock = model(**batch).logits
    assert text_diff(got, stock, ids, mask) > 1e-3, f"{family} {mode} gave the stock logits"
    for b, single in enumerate(singles):
        alone = model(**single).logits
        T = single["input_ids"].shape[1]
        diff = text_diff(got[b : b + 1, -T:], alone, single["input_ids"])
        assert diff <= 1e-4, f"{family} {mode} row {b}: batched vs alone {diff:.2e}"


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_eager_equals_sdpa(family):
    """dpvr.attention's fp32 sdpa (bf16 training on a CPU) too: the same numbers in fp32."""
    for name, cfg in MODES.items():
        eager = converted(family, cfg, "eager")
        batch, _ = sample(family, eager, ROWS)
        want = eager(**batch).logits
        for attn in ("sdpa", FP32_SDPA):
            got = converted(family, cfg, attn)(**batch).logits
            diff = text_diff(got, want, batch["input_ids"], batch["attention_mask"])
            assert diff <= 1e-5, f"{family} {name}: {attn} vs eager {diff:.2e}"


def generate(model, use_cache, inputs, n=32, **kw):
    kw = {"do_sample": False, **kw}
    return model.generate(**inputs, max_new_tokens=n, use_cache=use_cache, return_dict_in_generate=True,
                          output_logits=True, **kw)  # fmt: skip


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_recompute(family, mode):
    model = converted(family, MODES[mode])
    batch, _ = sample(family, model, ROWS[:2], seed=3)
    a, b = generate(model, True, batch), generate(model, False, batch)
    if mode == "fastv":  # cached, FastV ranks once at prefill; a recompute re-ranks by each new last token
        assert (a.logits[0] - b.logits[0]).abs().max() <= 1e-4, f"{family} fastv first step"
        return
    assert torch.equal(a.sequences, b.sequences), f"{family} {mode}: tokens differ\n{a.sequences}\n{b.sequences}"
    diff = max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))
    assert diff <= 1e-4, f"{family} {mode}: cached vs recompute logits {diff:.2e}"
    if mode == "lf":  # the stock model generates the same way in vanilla (positions at decode included)
        with model.routing(mode="vanilla"):
            stock = [generate(model, c, batch, n=8).sequences for c in (True, False)]
        assert torch.equal(stock[0], stock[1])


@torch.no_grad()
@pytest.mark.parametrize("mode", [m for m in MODES if m != "fastv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_and_sampling_with_the_cache(family, mode):
    model = converted(family, MODES[mode])
    batch, _ = sample(family, model, ROWS[:2], seed=4)
    beams = [generate(model, c, batch, n=8, num_beams=3).sequences for c in (True, False)]
    assert torch.equal(beams[0], beams[1]), f"{family} beam search cached vs recompute"
    drawn = []
    for c in (True, False):
        torch.manual_seed(7)
        drawn.append(generate(model, c, batch, n=8, do_sample=True, top_k=8).sequences)
    assert torch.equal(drawn[0], drawn[1]), f"{family} seeded sampling cached vs recompute"


@torch.no_grad()
@pytest.mark.parametrize("mode", ["lf", "lf-K0", "pc", "kv", "vtw", "fastv", "sparse"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_holds_what_the_schedule_says(family, mode):
    cfg = MODES[mode]
    model = converted(family, cfg)
    _, singles = sample(family, model, ROWS[:1])
    inputs = singles[0]
    cache = RoutedCache(L, cfg)
    model(**inputs, past_key_values=cache, use_cache=True)
    ids = inputs["input_ids"][0]
    text = set((ids != IMAGE).nonzero().flatten().tolist())
    image = set((ids == IMAGE).nonzero().flatten().tolist())
    for i, (keys, pruned) in enumerate(layer_contents(compile_schedule(cfg, L), L)):
        kv = cache.layers[i]
        held = set(kv.order[0][kv.valid[0]].tolist())
        if keys == TEXT:
            assert held == text, f"{family} {mode} layer {i}: cached {sorted(held)}, schedule says text only"
        elif not pruned:
            assert held == text | image, f"{family} {mode} layer {i}: schedule says all tokens"
        else:
            assert text <= held and len(held & image) == len(image) - int(len(image) * cfg.fastv_ratio)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(family, tmp_path):
    model = converted(family, MODES["lf"])
    batch, _ = sample(family, model, ROWS[:1])
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "adapter", side_branch_only=True)
    again = DPVRForConditionalGeneration.from_pretrained(tmp_path / "full", attn_implementation="eager")
    assert type(again) is type(model) and again.dpvr_config == model.dpvr_config
    onto = DPVRForConditionalGeneration.from_pretrained(tmp_path / "adapter", base_model=tiny_vlm(family, L))
    with torch.no_grad():
        want = model(**batch).logits
        for other in (again, onto):
            diff = (other(**batch).logits - want).abs().max().item()
            assert diff <= 1e-6, f"{family} reloaded model differs by {diff:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_stock_checkpoint_converts_without_random_weights(family, tmp_path):
    stock = tiny_vlm(family, L)
    stock.save_pretrained(tmp_path)  # the stock class's own checkpoint layout
    model = DPVRForConditionalGeneration.from_pretrained(tmp_path, dpvr_config=MODES["lf"])
    assert type(model).__name__ == f"DPVR{type(stock).__name__}" and isinstance(model, type(stock))
    got = model.state_dict()
    for key, value in stock.state_dict().items():
        assert torch.equal(got[key], value), f"{family}: {key} differs from the checkpoint (randomly initialised?)"
    split = MODES["lf"].split_layer
    for key, value in model.side_branch[0].state_dict().items():
        assert torch.equal(value, model.model.language_model.layers[split].state_dict()[key]), key


@pytest.mark.parametrize("family", QWEN)
def test_video_input_is_refused_by_name(family):
    model = converted(family, MODES["lf"])
    batch, _ = sample(family, model, ROWS[:1])
    with pytest.raises(DPVRError, match="pixel_values_videos: video input is not routed yet"):
        model(**batch, pixel_values_videos=torch.zeros(4, 24), video_grid_thw=torch.tensor([[1, 2, 2]]))


def test_a_family_class_refuses_another_familys_checkpoint(tmp_path):
    tiny_vlm("llava_next", L).save_pretrained(tmp_path)
    qwen_class = type(converted("qwen2_vl", MODES["lf"]))
    with pytest.raises(DPVRError, match="holds a llava_next model, which DPVRQwen2VLForConditionalGeneration cannot"):
        qwen_class.from_pretrained(tmp_path, dpvr_config=MODES["lf"])
