"""Edges users reach (issue 42): each case either gives the exact (stock or reference) result or a
one-line refusal that names the parameter; never a silent wrong answer."""
from __future__ import annotations

import pytest
import torch
from families import IMAGE, QWEN, sample, tiny_vlm
from tiny import IMAGE_TOKEN, pixels, prompt, tiny_llava

from dpvr import DPVRConfig, DPVRError, convert


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg


def _greedy(model, n=3, **inputs):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True)


@torch.no_grad()
@pytest.mark.parametrize("family", QWEN)
def test_qwen_chat_continues_from_its_cache_after_another_prompt_was_generated(family):
    """The cache holds its conversation's rope deltas; generate() would take the model's, which the
    other prompt (an image of another shape, so other deltas) left there."""
    model = convert(tiny_vlm(family), DPVRConfig(mode="lf", split_layer=3))
    (_, (a, b)) = sample(family, model, [(3, [1], 2), (2, [0], 4)])
    first = _greedy(model, **a)
    _greedy(model, **b)  # another prompt in between
    assert not torch.equal(model.model.rope_deltas, first.past_key_values.rope_deltas), "the test needs other deltas"
    turn = torch.tensor([[20, 21, 22]])
    ids = torch.cat([first.sequences, turn], dim=1)
    cont = _greedy(model, input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=first.past_key_values)
    fresh = _greedy(model, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=a["pixel_values"], image_grid_thw=a["image_grid_thw"],
                    mm_token_type_ids=(ids == IMAGE).int())  # fmt: skip
    diff = max((x - y).abs().max().item() for x, y in zip(cont.logits, fresh.logits))
    assert diff < 1e-4, f"continuing from the cache differs from the whole conversation by {diff:.3e}"


def _hole(ids: torch.Tensor, at: int) -> torch.Tensor:
    """An attention mask (1, T) with one masked token mid-prompt at `at` (not left padding)."""
    mask = torch.ones_like(ids)
    mask[0, at] = 0
    return mask


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("mode", ["lf", "fastv"])
def test_a_mask_with_a_hole_mid_prompt_gives_the_stock_result_on_text(family, mode):
    """The stock forward (no position_ids) numbers tokens by their index, the hole included: positions
    counted over unmasked tokens put every token after the hole one closer to those before it."""
    stock = tiny_llava() if family == "llava" else tiny_vlm(family)
    ids = torch.tensor([prompt(9, 0, n_images=0)])
    mask = _hole(ids, 4)
    want = stock(input_ids=ids, attention_mask=mask).logits
    model = convert(stock, DPVRConfig(mode=mode, split_layer=3))
    got = model(input_ids=ids, attention_mask=mask).logits
    keep = mask[0].bool()
    assert torch.allclose(got[0, keep], want[0, keep], atol=1e-5), (got[0, keep] - want[0, keep]).abs().max()


@torch.no_grad()
def test_a_mask_with_a_hole_in_an_image_prompt_matches_the_reference_with_stock_positions():
    from reference import reference_logits

    model = convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=3))
    ids, px = torch.tensor([prompt(5, 6)]), pixels(1)
    mask = _hole(ids, ids.shape[1] - 3)  # a text token after the image
    got = model(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    want = reference_logits(model, model.side_branch, model.dpvr_config, ids, px, mask)
    keep = mask[0].bool() & (ids[0] != IMAGE_TOKEN)
    assert torch.allclose(got[0, keep], want[0, keep], atol=1e-4), (got[0, keep] - want[0, keep]).abs().max()


@torch.no_grad()
@pytest.mark.parametrize("mode", ["lf", "fastv"])
def test_a_prompt_ending_in_an_image_token_is_refused_for_generation(mode):
    model = convert(tiny_llava(), DPVRConfig(mode=mode, split_layer=3))
    ids, px = torch.tensor([prompt(4, 0)]), pixels(1)  # the image span is the prompt's end
    with pytest.raises(DPVRError) as exc:
        model.generate(input_ids=ids, pixel_values=px, max_new_tokens=2, do_sample=False)
    assert "end with an image token" in one_line(exc)
    with pytest.raises(DPVRError, match="end with an image token"):
        model(input_ids=ids, pixel_values=px, logits_to_keep=1)
    model(input_ids=ids, pixel_values=px)  # every position's logits (training, scoring): text positions are exact
    model.generate(input_ids=torch.tensor([prompt(4, 2)]), pixel_values=px, max_new_tokens=2, do_sample=False)


def test_side_branch_only_save_of_a_model_whose_base_trains_is_refused(tmp_path):
    model = convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=3, freeze="none"))
    with pytest.raises(DPVRError) as exc:
        model.save_pretrained(tmp_path / "a", side_branch_only=True)
    assert "side_branch_only" in one_line(exc) and "freeze='none'" in one_line(exc)
    assert not (tmp_path / "a").exists()
    model.save_pretrained(tmp_path / "b")  # the whole model: base weights included
    assert (tmp_path / "b" / "config.json").exists()


@torch.no_grad()
@pytest.mark.parametrize("mode", ["lf", "kv", "fastv"])
def test_output_attentions_on_a_text_prompt_gives_the_stock_attentions(mode):
    stock = tiny_llava()
    ids = torch.tensor([prompt(7, 0, n_images=0)])
    want = stock(input_ids=ids, output_attentions=True)
    model = convert(stock, DPVRConfig(mode=mode, split_layer=3))
    got = model(input_ids=ids, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == 6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got.attentions, want.attentions))
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    with pytest.raises(NotImplementedError) as exc:  # an image prompt: its layers see different token sets
        model(input_ids=torch.tensor([prompt(2, 2)]), pixel_values=pixels(1), output_attentions=True)
    assert "output_attentions" in one_line(exc)


def test_routing_to_another_split_than_the_side_branchs_is_refused():
    model = convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=3))
    with pytest.raises(DPVRError) as exc:
        with model.routing(split_layer=2):
            pass
    assert "split_layer=2 does not fit the side branch, made for split_layer=3" in one_line(exc)
    with pytest.raises(DPVRError, match="made for split_layer=3"):  # nor through a mode that ignores the split
        with model.routing(mode="vanilla", split_layer=4), model.routing(mode="pc"):
            pass
    with model.routing(mode="vtw", split_layer=2), model.routing(mode="kv", split_layer=3):
        pass  # no side branch in vtw; kv at the side branch's own split


def test_fastv_ratio_1_with_shallow_fastv_is_refused_at_config_time_where_a_side_branch_needs_images():
    for mode in ("lf", "pc", "kv"):
        with pytest.raises(DPVRError) as exc:
            convert(tiny_llava(), DPVRConfig(mode=mode, split_layer=3, shallow_fastv=True, fastv_layer=1, fastv_ratio=1.0))
        assert "fastv_ratio=1.0" in one_line(exc) and "shallow_fastv" in one_line(exc)
    model = convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=3, shallow_fastv=True, fastv_layer=1))
    with pytest.raises(DPVRError, match="fastv_ratio=1.0"):
        with model.routing(fastv_ratio=1.0):
            pass
    vtw = convert(tiny_llava(), DPVRConfig(mode="vtw", split_layer=3, shallow_fastv=True, fastv_layer=1, fastv_ratio=1.0))
    with torch.no_grad():  # no side branch: every image token dropped is simply text-only deep layers
        assert torch.isfinite(vtw(input_ids=torch.tensor([prompt(2, 3)]), pixel_values=pixels(1)).logits).all()


@torch.no_grad()
def test_vanilla_routing_of_a_shallow_fastv_model_is_the_stock_forward():
    stock = tiny_llava()
    ids, px = torch.tensor([prompt(2, 3)]), pixels(1)
    want = stock(input_ids=ids, pixel_values=px).logits
    model = convert(stock, DPVRConfig(mode="lf", split_layer=3, shallow_fastv=True, fastv_layer=1))
    with model.routing(mode="vanilla"):
        got = model(input_ids=ids, pixel_values=px).logits
    assert torch.allclose(got, want, atol=1e-6)
    assert model.dpvr_config.shallow_fastv  # restored after the block


@pytest.mark.parametrize("attn", ["flex_attention"])  # flash attention is not installed here to build a model with
def test_routed_modes_under_an_attention_routing_cannot_use_are_refused_at_convert(attn):
    with pytest.raises(DPVRError) as exc:
        convert(tiny_llava(attn=attn), DPVRConfig(mode="lf", split_layer=3))
    assert f"attn_implementation={attn!r}" in one_line(exc)
    model = convert(tiny_llava(attn=attn), DPVRConfig(mode="vanilla"))  # the stock forward: its own business
    with pytest.raises(DPVRError, match="attn_implementation"):
        with model.routing(mode="fastv"):
            pass


def test_a_corrupt_config_json_is_named(tmp_path):
    from dpvr.loading import load_model
    from dpvr.routing import DPVRForConditionalGeneration

    (tmp_path / "config.json").write_text('{"model_type": "llava", "text_config": {')
    with pytest.raises(DPVRError) as exc:
        load_model(model=str(tmp_path))
    assert f"{tmp_path / 'config.json'} is not valid JSON" in one_line(exc)
    with pytest.raises(DPVRError) as exc:
        DPVRForConditionalGeneration.from_pretrained(str(tmp_path))
    assert f"{tmp_path / 'config.json'} is not valid JSON" in one_line(exc)
