"""The side branch inside vLLM: dpvr's own routed layer (HF decoder layers, `dpvr.routing.layer`) on
each request's image tokens, padded into one (requests, width, D) block per step.

The side branch attends only among a request's own image tokens and is needed only while those are
in the step (a prefill: their keys/values reach later steps through the fusion layers' KV cache), so
it needs no KV cache of its own and runs in plain torch, with the exact layer HF DPVR runs.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from dpvr.routing.layer import routed_layer
from dpvr.routing.side import SideBranch


def build_side_branch(text_config, split_layer: int, depth: int) -> tuple[SideBranch, nn.Module]:
    """(The side branch's D layers, state-dict keys `side_branch.<j>.*` as dpvr saves them; its rotary
    embedding). sdpa attention, as dpvr loads models by default."""
    config = copy.deepcopy(text_config)
    config._attn_implementation = "sdpa"
    layers = SideBranch(LlamaDecoderLayer(config, split_layer + j) for j in range(depth))
    return layers.eval(), LlamaRotaryEmbedding(config=config)


def image_blocks(image_req: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block row, column) of each image row in a (requests with images, width) layout; image_req (N,)
    is each image row's request index, ascending (rows come in batch order)."""
    _, block_row, counts = torch.unique_consecutive(image_req, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return block_row, torch.arange(image_req.numel()) - starts[block_row]


def run_side_branch(side: SideBranch, rope: nn.Module, h_img: torch.Tensor, pos_img: torch.Tensor,
                    image_req: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Side-branch output (N_img, D) for image rows h_img (N_img, D) at positions pos_img (N_img,):
    causal attention among each request's own image tokens, by position."""
    block_row, col = image_blocks(image_req)
    shape = (int(block_row.max()) + 1, int(col.max()) + 1)
    valid = torch.zeros(shape, dtype=torch.bool)
    valid[block_row, col] = True
    order = torch.zeros(shape, dtype=torch.long)
    order[block_row, col] = pos_img.long()
    hs = h_img.new_zeros(*shape, h_img.shape[-1])
    hs[block_row, col] = h_img
    cos, sin = rope(hs, order)
    for layer in side:
        hs = routed_layer(layer, hs, order, valid, cos, sin, keep_keys=False)[0]
    return hs[block_row, col]
