"""torch.compile of a routed model (issue 42): the compiled forward and generate() equal eager (fp32).
The routed loop graph-breaks on its data-dependent token sets (which positions hold image tokens), so
dynamo compiles it in pieces; static (dynamic=False, a recompile per prompt length) and dynamic shapes
(dynamic=True: symbolic lengths) both hold."""
from __future__ import annotations

import pytest
import torch
from tiny import pixels, prompt, tiny_llava

from dpvr import DPVRConfig, convert


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
@torch.no_grad()
def test_compiled_lf_prefill_equals_eager_at_three_prompt_lengths(dynamic):
    model = convert(tiny_llava(layers=4), DPVRConfig(mode="lf", split_layer=2))
    compiled = torch.compile(model, dynamic=dynamic)
    for pre, post in [(2, 2), (4, 3), (3, 6)]:  # other lengths: recompiled (static) or symbolic (dynamic)
        ids, px = torch.tensor([prompt(pre, post)]), pixels(1)
        want = model(input_ids=ids, pixel_values=px).logits
        got = compiled(input_ids=ids, pixel_values=px).logits
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
@torch.no_grad()
def test_generate_with_a_compiled_forward_equals_eager_with_the_routed_cache(dynamic):
    model = convert(tiny_llava(layers=4), DPVRConfig(mode="lf", split_layer=2))
    ids, px = torch.tensor([prompt(2, 2)]), pixels(1)
    args = dict(input_ids=ids, pixel_values=px, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                output_logits=True)  # fmt: skip
    want = model.generate(**args)
    model.forward = torch.compile(model.forward, dynamic=dynamic)  # as transformers documents for generate()
    got = model.generate(**args)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got.logits, want.logits))
