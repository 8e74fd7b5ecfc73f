"""Odd but legitimate uses of the model API give what stock transformers gives, or a one-line refusal."""
from __future__ import annotations

import pytest
import torch
from tiny import IMAGE_TOKEN, pixels, prompt, tiny_llava
from transformers import LogitsProcessor, LogitsProcessorList

from dpvr import DPVRConfig, DPVRForConditionalGeneration, convert
from dpvr.errors import DPVRError

ROUTED = ["lf", "pc", "kv", "vtw", "fastv"]


def routed(mode: str, **kw):
    return convert(tiny_llava(), DPVRConfig(mode=mode, split_layer=2, fastv_layer=1, **kw))


@torch.no_grad()
@pytest.mark.parametrize("mode", ROUTED)
def test_output_hidden_states_end_after_the_final_norm_like_stock(mode):
    """Text-only prompt: every routed mode is the stock computation, hidden states included."""
    ids = torch.tensor([prompt(9, 0, n_images=0)])
    want = tiny_llava()(input_ids=ids, output_hidden_states=True).hidden_states
    got = routed(mode)(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g - w).abs().max() <= 1e-5, f"{mode}: hidden state {i} of {len(want)} differs from stock"


class ForceAt(LogitsProcessor):
    """Force token `token` at generation step `step` (counting from 0), whatever the model prefers."""

    def __init__(self, prompt_len: int, step: int, token: int):
        self.at, self.token = prompt_len + step, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.token] = 0
        return scores


def gen(model, ids, px=None, **kw):
    kw.setdefault("max_new_tokens", 4)
    if px is not None:
        kw["pixel_values"] = px
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kw)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["lf", "kv"])
def test_generate_returns_each_decode_steps_hidden_states(mode):
    ids = torch.tensor([prompt(7, 0, n_images=0)])
    stock = gen(tiny_llava(), ids, output_hidden_states=True, return_dict_in_generate=True)
    out = gen(routed(mode), ids, output_hidden_states=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, stock.sequences)
    assert len(out.hidden_states) == len(stock.hidden_states) == 4
    for step, (g, w) in enumerate(zip(out.hidden_states, stock.hidden_states)):
        assert g is not None and len(g) == len(w), f"step {step}: {None if g is None else len(g)} states"
        for i, (a, b) in enumerate(zip(g, w)):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-5, f"step {step}, state {i} differs from stock"
    # and with an image: one state per layer (+ embeddings) at every decode step too
    ids, px = torch.tensor([prompt(3, 4)]), pixels(1)
    out = gen(routed(mode), ids, px, output_hidden_states=True, return_dict_in_generate=True)
    assert all(h is not None and len(h) == len(stock.hidden_states[0]) for h in out.hidden_states)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["lf", "pc", "fastv"])
def test_generating_the_image_token_id_continues_like_stock(mode):
    force = lambda n: LogitsProcessorList([ForceAt(n, 1, IMAGE_TOKEN)])  # noqa: E731
    ids = torch.tensor([prompt(7, 0, n_images=0)])  # text-only: the routed model must match stock exactly
    want = gen(tiny_llava(), ids, logits_processor=force(ids.shape[1]), max_new_tokens=5)
    got = gen(routed(mode), ids, logits_processor=force(ids.shape[1]), max_new_tokens=5)
    assert int(want[0, ids.shape[1] + 1]) == IMAGE_TOKEN
    assert torch.equal(got, want), f"{mode}: {got.tolist()} vs stock {want.tolist()}"
    ids, px = torch.tensor([prompt(3, 4)]), pixels(1)  # with an image in the prompt: continues too
    out = gen(routed(mode), ids, px, logits_processor=force(ids.shape[1]), max_new_tokens=5)
    assert out.shape[1] == ids.shape[1] + 5 and int(out[0, ids.shape[1] + 1]) == IMAGE_TOKEN


@torch.no_grad()
def test_prompt_lookup_and_assisted_decoding_get_the_one_line_refusal():
    ids = torch.tensor([prompt(3, 4)])
    with pytest.raises(DPVRError, match="prompt_lookup_num_tokens=2 is not supported in routed modes"):
        gen(routed("lf"), ids, pixels(1), prompt_lookup_num_tokens=2)
    model = routed("lf")  # vanilla routing on the same weights keeps HF's assisted decoding
    with model.routing(mode="vanilla"):
        out = gen(model, ids, pixels(1), prompt_lookup_num_tokens=2)
    assert out.shape[1] == ids.shape[1] + 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A full DPVR-LF checkpoint (s=2, D=1) and an adapter of it."""
    root = tmp_path_factory.mktemp("saved")
    model = routed("lf")
    model.save_pretrained(root / "full")
    model.save_pretrained(root / "adapter", side_branch_only=True)
    return root


@torch.no_grad()
@pytest.mark.parametrize("kind", ["full", "adapter"])
def test_from_pretrained_applies_a_compatible_dpvr_config(saved, kind):
    extra = {"base_model": tiny_llava()} if kind == "adapter" else {}
    cfg = DPVRConfig(mode="pc", split_layer=2)  # the same side branch (s=2, D=1), another mode
    model = DPVRForConditionalGeneration.from_pretrained(saved / kind, dpvr_config=cfg, **extra)
    assert model.dpvr_config == cfg, "the passed dpvr_config was ignored"
    plain = DPVRForConditionalGeneration.from_pretrained(saved / kind, **({"base_model": tiny_llava()} if extra else {}))
    ids, px = torch.tensor([prompt(3, 4)]), pixels(1)
    with plain.routing(mode="pc"):
        want = plain(input_ids=ids, pixel_values=px).logits
    assert torch.allclose(model(input_ids=ids, pixel_values=px).logits, want, atol=1e-6)
    vtw = DPVRForConditionalGeneration.from_pretrained(saved / kind, dpvr_config=DPVRConfig(mode="vtw", split_layer=4), **(
        {"base_model": tiny_llava()} if extra else {}))  # fmt: skip
    assert vtw.dpvr_config.mode == "vtw" and vtw.dpvr_config.split_layer == 4


@pytest.mark.parametrize("kind", ["full", "adapter"])
def test_from_pretrained_refuses_a_dpvr_config_its_side_branch_does_not_fit(saved, kind):
    extra = lambda: {"base_model": tiny_llava()} if kind == "adapter" else {}  # noqa: E731
    with pytest.raises(DPVRError, match=r"does not fit the side branch saved in .*'split_layer': \(2, 3\)"):
        DPVRForConditionalGeneration.from_pretrained(saved / kind, dpvr_config=DPVRConfig(split_layer=3), **extra())
    with pytest.raises(DPVRError, match=r"'side_depth': \(1, 2\)"):
        DPVRForConditionalGeneration.from_pretrained(saved / kind, dpvr_config=DPVRConfig(split_layer=2, side_depth=2),
                                                     **extra())  # fmt: skip
    with pytest.raises(DPVRError, match="split_layer=9 out of range"):
        DPVRForConditionalGeneration.from_pretrained(saved / kind, dpvr_config=DPVRConfig(mode="vtw", split_layer=9),
                                                     **extra())  # fmt: skip


def test_from_pretrained_refuses_folders_that_hold_no_checkpoint(saved, tmp_path):
    with pytest.raises(DPVRError, match="has no dpvr_adapter.json: not a DPVR adapter or checkpoint"):
        DPVRForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(DPVRError, match="has no dpvr_adapter.json: not a DPVR adapter$"):
        DPVRForConditionalGeneration.from_pretrained(saved / "full", base_model=tiny_llava())
