"""Attention implementations dpvr registers with transformers' dispatch (`ALL_ATTENTION_FUNCTIONS`), so
any model loaded with `attn_implementation=` one of these names runs them in its own layers.

`FP32_SDPA`: sdpa with its product computed in fp32 while the rest of the model autocasts to bf16.
On a CPU, autocast runs sdpa in bf16, whose backward is the slowest part of a training step at small
head sizes (head_dim 32: 1.4x the fp32 backward); the fp32 one is both faster there and exact.
`dpvr train` uses it for bf16 autocast without a GPU (measured in docs/train.md, "Mixed precision");
on a GPU, bf16 sdpa (flash) is the fast one and stays.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

FP32_SDPA = "dpvr_sdpa_fp32"
# contrastive attention (dpvr.contrast, which registers them) wraps each base implementation under its own name
CONTRAST_OF = {"sdpa": "dpvr_contrast_sdpa", FP32_SDPA: "dpvr_contrast_sdpa_fp32", "eager": "dpvr_contrast_eager"}
# same semantics as sdpa: is_causal when no mask, the same kernels
SDPA_LIKE = ("sdpa", FP32_SDPA, CONTRAST_OF["sdpa"], CONTRAST_OF[FP32_SDPA])


def sdpa_in_fp32(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    """sdpa on fp32 copies of (B, H, N, hd) query/key/value (an additive mask too), outside autocast;
    the output (B, N, H, hd) comes back in the query's dtype."""
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)  # fmt: skip
    return out.to(query.dtype), weights


AttentionInterface.register(FP32_SDPA, sdpa_in_fp32)
AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)  # the stock models build sdpa's masks for it
