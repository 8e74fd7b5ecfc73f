"""Edges users reach (issue 42): each case either gives the exact (stock or reference) result or a
one-line refusal that names the parameter; never a silent wrong answer."""
from __future__ import annotations

import pytest
import torch
from families import IMAGE, QWEN, sample, tiny_vlm

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
