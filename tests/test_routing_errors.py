"""Bad input gets a clear one-line error that names the problem; never a silent wrong answer."""
from __future__ import annotations

import pytest
import torch
from tiny import IMAGE_TOKEN, N_IMG, left_pad, pixels, prompt, tiny_llava
from transformers import DynamicCache

from dpvr import DPVRConfig, DPVRError, NonFiniteError, convert


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="lf", split_layer=6), r"split_layer=6 out of range: need 1 <= split_layer < 6"),
        (dict(mode="pc", split_layer=0), r"split_layer=0 must be >= 1"),
        (dict(mode="lf", split_layer=4, fusion_layers=3), r"fusion_layers=3 out of range: need 0 <= fusion_layers <= 2"),
        (dict(mode="kv", split_layer=4, side_depth=3), r"side_depth=3 out of range"),
        (dict(mode="lf", side_depth=0), r"side_depth=0 must be >= 1"),
        (dict(mode="fastv", fastv_ratio=1.5), r"fastv_ratio=1.5 must be in \[0, 1\]"),
        (dict(mode="fastv", fastv_layer=5), r"fastv_layer=5 out of range"),
        (dict(mode="routed"), r"mode='routed' is not one of"),
        (dict(split_layer=-1), r"split_layer=-1 must be a non-negative int"),
    ],
)
def test_config_out_of_range_is_rejected_before_any_forward(kwargs, match):
    with pytest.raises(DPVRError) as exc:
        convert(tiny_llava(), DPVRConfig(**kwargs))
    assert __import__("re").search(match, one_line(exc)), one_line(exc)


@pytest.fixture(scope="module")
def model():
    return convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=2))


def test_image_token_count_mismatch_reports_both_counts(model):
    ids = torch.tensor([prompt(2, 3) + [IMAGE_TOKEN] * 2])  # one image span plus 2 stray image tokens
    with pytest.raises(DPVRError) as exc:
        model(input_ids=ids, pixel_values=pixels(1))
    assert f"{N_IMG + 2} image tokens" in one_line(exc) and f"{N_IMG} features from 1 image" in one_line(exc)


def test_pixels_without_image_tokens_and_the_reverse(model):
    with pytest.raises(DPVRError, match="no image token") as exc:
        model(input_ids=torch.tensor([prompt(5, 0, n_images=0)]), pixel_values=pixels(1))
    one_line(exc)
    with pytest.raises(DPVRError, match=f"{N_IMG} image tokens .* but no pixel_values") as exc:
        model(input_ids=torch.tensor([prompt(2, 2)]))
    one_line(exc)


def test_padding_inside_an_image_span_and_empty_rows(model):
    ids, mask = left_pad([prompt(2, 2), prompt(4, 4)])
    bad = mask.clone()
    bad[0, (ids[0] == IMAGE_TOKEN).nonzero()[0]] = 0
    with pytest.raises(DPVRError, match=r"masks out image tokens in rows \[0\]"):
        model(input_ids=ids, pixel_values=pixels(2), attention_mask=bad)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(DPVRError, match=r"rows \[1\] are all zeros"):
        model(input_ids=ids, pixel_values=pixels(2), attention_mask=empty)


def test_non_routed_cache_and_bad_position_ids_are_refused(model):
    ids = torch.tensor([prompt(2, 2)])
    cache = DynamicCache(config=model.config.text_config)
    k = torch.zeros(1, 2, 3, 12)
    cache.update(k, k, 0)
    with pytest.raises(DPVRError, match="cannot continue from a DynamicCache"):
        model(input_ids=ids, pixel_values=pixels(1), past_key_values=cache)
    with pytest.raises(DPVRError, match="position_ids must be"):
        model(input_ids=ids, pixel_values=pixels(1), position_ids=torch.arange(5)[None])


def test_output_attentions_fails_loudly(model):
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(input_ids=torch.tensor([prompt(2, 2)]), pixel_values=pixels(1), output_attentions=True)


@pytest.mark.parametrize("where,name", [("layer", "layer 4"), ("side", "side_branch.0")])
def test_nan_inside_a_layer_names_the_layer(where, name):
    model = convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=2, fusion_layers=2))
    module = model.model.language_model.layers[4] if where == "layer" else model.side_branch[0]
    with torch.no_grad():
        module.mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError) as exc:
        model(input_ids=torch.tensor([prompt(2, 4)]), pixel_values=pixels(1))
    assert one_line(exc).startswith(f"{name} produced NaN/inf"), one_line(exc)


def test_unsupported_architectures_are_named():
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    from tiny import tiny_config

    cfg = tiny_config()
    vip = VipLlavaConfig(vision_config=cfg.vision_config.to_dict(), text_config=cfg.text_config.to_dict(),
                         vision_feature_layers=[-2])  # fmt: skip
    with pytest.raises(NotImplementedError, match="dpvr routes llava, llava_next, .*got model_type 'vipllava'"):
        convert(VipLlavaForConditionalGeneration(vip), DPVRConfig(split_layer=2))


def test_right_padding_at_generation_is_refused(model):
    ids, mask = left_pad([prompt(2, 2), prompt(4, 4)])
    right_ids, right_mask = ids.flip(1), mask.flip(1)  # just to get pads at the end of row 0
    right_ids[0] = torch.cat([ids[0][mask[0] == 1], ids[0][mask[0] == 0]])
    right_ids[1] = ids[1]
    right_mask[0], right_mask[1] = mask[0].flip(0), mask[1]
    with pytest.raises(DPVRError, match=r"rows \[0\] are right-padded") as exc:
        model.generate(input_ids=right_ids, attention_mask=right_mask, pixel_values=pixels(2), max_new_tokens=2)
    one_line(exc)
