"""dpvr.attention's fp32 sdpa: sdpa itself in fp32 (stock and routed models, padded batches), the
product kept in fp32 under bf16 autocast, and `dpvr train` choosing it for bf16 without a GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import IMAGE_TOKEN, left_pad, pixels, prompt, tiny_llava

from dpvr import DPVRConfig, convert
from dpvr.attention import FP32_SDPA, sdpa_in_fp32
from dpvr.train.cli import parse

ROWS = [prompt(3, 6, seed=5), prompt(1, 2, seed=6)]


def _model(attn: str, cfg: DPVRConfig | None):
    model = tiny_llava(seed=0, attn=attn)
    return convert(model, cfg) if cfg else model


@torch.no_grad()
@pytest.mark.parametrize("cfg", [None, DPVRConfig(mode="lf", split_layer=2, fusion_layers=2),
                                 DPVRConfig(mode="pc", split_layer=3), DPVRConfig(mode="kv", split_layer=3, side_depth=2)],
                         ids=["stock", "lf", "pc", "kv"])  # fmt: skip
def test_fp32_sdpa_is_sdpa_in_fp32(cfg):
    (ids, mask), px = left_pad(ROWS), pixels(2)
    got = _model(FP32_SDPA, cfg)(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    want = _model("sdpa", cfg)(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    text = (ids != IMAGE_TOKEN) & (mask == 1)
    torch.testing.assert_close(got[text], want[text], rtol=0, atol=1e-6)


def test_under_bf16_autocast_the_product_stays_fp32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g).bfloat16() for _ in range(3))
    bias = torch.zeros(2, 1, 9, 9, dtype=torch.bfloat16).masked_fill(torch.rand(9, 9, generator=g) < 0.3, -1e4)
    module = torch.nn.Module()
    module.is_causal = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = sdpa_in_fp32(module, q, k, v, bias, scaling=8**-0.5)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float()).transpose(1, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want.bfloat16(), rtol=0, atol=0)


def test_autocast_training_step_with_it_tracks_fp32():
    """A bf16-autocast loss and gradient of the routed model with fp32 attention stay close to fp32's."""
    (ids, mask), px = left_pad(ROWS), pixels(2)
    labels = ids.masked_fill((ids == IMAGE_TOKEN) | (mask == 0), -100)
    grads = {}
    for name, attn, bf16 in (("fp32", "sdpa", False), ("bf16", FP32_SDPA, True)):
        model = _model(attn, DPVRConfig(mode="lf", split_layer=2, fusion_layers=2)).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, pixel_values=px, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads[name] = (loss.item(), torch.cat([p.grad.flatten() for p in model.side_branch.parameters()]))
    (l32, g32), (l16, g16) = grads["fp32"], grads["bf16"]
    assert abs(l16 - l32) < 0.01 * l32, (l16, l32)
    assert torch.cosine_similarity(g16, g32, dim=0) > 0.99


@pytest.mark.parametrize("flags, attn", [(["--bf16", "true"], FP32_SDPA), (["--bf16", "false"], "sdpa"),
                                         (["--bf16", "true", "--attn", "eager"], "eager")])  # fmt: skip
def test_dpvr_train_picks_it_for_bf16_without_a_gpu(tmp_path, flags, attn):
    if torch.accelerator.is_available():
        pytest.skip("on a GPU bf16 sdpa stays")
    margs = parse(["--output_dir", str(tmp_path), *flags])[0]
    assert margs.attn == attn
