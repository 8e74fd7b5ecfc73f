"""Text-only attention metadata for one vLLM step on the CPU backend: how text-only layers read and
write a KV cache that holds each request's text tokens only.

vLLM gives every layer of a KV-cache group the same metadata: per request, its query rows
(`query_start_loc`), how many cached tokens its queries see (`seq_lens`), its blocks (`block_table`),
and per token the cache slot its key/value goes to (`slot_mapping`). A text-only layer sees the same
requests with image tokens taken out, so:

  - a text token's key/value goes to its *text index* (its sequence index less the image tokens
    before it), inside the request's own blocks: text-only layers fill the first T_text slots of the
    blocks the request already holds for all its tokens (KV memory is not saved, compute is);
  - queries are the step's text rows, seq_lens count text tokens only, and the CPU kernel's scheduler
    metadata (work split by query and key counts) is rebuilt for those counts.

A decoding request has no image token in its step, yet its text index needs its prompt's image count:
`ImageCounts` keeps it from the request's prefill, keyed by the request's first KV block (unique
among live requests, and rewritten by the next request's prefill when the block is reused). That
needs every prompt to arrive in one step: prefix caching and chunked prefill are refused
(`dpvr.serve.vllm.checks`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

from dpvr.errors import DPVRError


class ImageCounts:
    """Image tokens in each live request's prompt, indexed by the request's first KV block id."""

    def __init__(self) -> None:
        self.by_block = torch.zeros(0, dtype=torch.long)

    def update(self, first_block: torch.Tensor, prefill: torch.Tensor, in_step: torch.Tensor) -> torch.Tensor:
        """(R,) image tokens each request had before this step (0 for a prefill); records prefills'."""
        need = int(first_block.max()) + 1 if first_block.numel() else 0
        if need > self.by_block.numel():
            grown = torch.zeros(max(need, 2 * self.by_block.numel()), dtype=torch.long)
            grown[: self.by_block.numel()] = self.by_block
            self.by_block = grown
        before = torch.where(prefill, 0, self.by_block[first_block])
        self.by_block[first_block[prefill]] = in_step[prefill]
        return before


@dataclass
class TextStep:
    """One step's token sets and the text-only metadata (None when no request holds an image)."""

    text_rows: torch.Tensor  # (N_text,) flat rows of the step's text tokens
    image_rows: torch.Tensor  # (N_img,) flat rows of its image tokens, in order
    image_req: torch.Tensor  # (N_img,) request index of each image row
    prefill: torch.Tensor  # (R,) bool: the request's whole sequence is in this step
    metadata: CPUAttentionMetadata | None
    slots: torch.Tensor | None  # (N_text,) KV slots of the text rows in text-only layers


def text_step(meta: CPUAttentionMetadata, maybe_img: torch.Tensor, counts: ImageCounts, attn,
              dtype: torch.dtype) -> TextStep:  # fmt: skip
    """The text-only view of stock metadata `meta`. maybe_img (N,) flags rows holding the image
    placeholder id; only prefill rows are image tokens (a sampled token with that id is text, as in
    HF generate). `attn` is a text-only layer's Attention module (heads, ISA, cache layout); dtype the model's."""
    if not isinstance(meta, CPUAttentionMetadata):
        raise DPVRError(f"dpvr's vLLM plugin runs on vLLM's CPU attention backend, not {type(meta).__name__}")
    n, qsl, seq_lens = meta.num_actual_tokens, meta.query_start_loc.long(), meta.seq_lens.long()
    q_lens = qsl[1:] - qsl[:-1]
    R = q_lens.numel()
    req = torch.repeat_interleave(torch.arange(R), q_lens)  # (n,) request of each row
    prefill = seq_lens == q_lens  # the whole sequence is in this step (no chunking, no cached prefix)
    is_img = maybe_img[:n] & prefill[req]
    img_in_step = torch.zeros(R, dtype=torch.long).index_add_(0, req, is_img.long())
    img_before = counts.update(meta.block_table[:R, 0].long(), prefill, img_in_step)
    text_rows, image_rows = (~is_img).nonzero().squeeze(1), is_img.nonzero().squeeze(1)
    step = TextStep(text_rows, image_rows, req[image_rows], prefill, None, None)
    if not bool((img_before + img_in_step).any()):
        return step  # no image anywhere: text-only layers are stock layers
    # a row's text index: its sequence index less the image tokens before it, in earlier steps and in
    # this step's rows of its request (every request has a row here, so qsl[:-1] indexes rows)
    seq_idx = torch.arange(n) - qsl[req] + (seq_lens - q_lens)[req]
    img_rows_before = torch.cumsum(is_img.long(), 0) - is_img.long()  # in the whole step
    img_before_row = img_before[req] + img_rows_before - img_rows_before[qsl[:-1]][req]
    text_idx = (seq_idx - img_before_row)[text_rows]
    block_size = attn.kv_cache.shape[2]  # (blocks, kv heads, block size, 2 * head size) on CPU
    text_req = req[text_rows]
    blocks = meta.block_table[text_req, text_idx // block_size].long()
    slots = blocks * block_size + text_idx % block_size
    q_text = q_lens - img_in_step
    qsl_text = torch.zeros(R + 1, dtype=meta.query_start_loc.dtype)
    qsl_text[1:] = torch.cumsum(q_text, 0)
    seq_text = (seq_lens - img_before - img_in_step).to(meta.seq_lens.dtype)
    step.metadata = dataclasses.replace(
        meta, num_actual_tokens=int(text_rows.numel()), max_query_len=int(q_text.max()), query_start_loc=qsl_text,
        max_seq_len=int(seq_text.max()), seq_lens=seq_text, slot_mapping=slots,
        scheduler_metadata=_scheduler_metadata(attn, dtype, R, seq_text, qsl_text, meta.causal),
    )  # fmt: skip
    step.slots = slots
    return step


def _scheduler_metadata(attn, dtype: torch.dtype, R: int, seq_lens: torch.Tensor, qsl: torch.Tensor,
                        causal: bool) -> torch.Tensor:  # fmt: skip
    """The CPU kernel's work split for the text-only counts, with the settings the stock builder used
    for this layer group (heads, head size, ISA, dtype; no sliding window: llama layers have none)."""
    impl = attn.impl
    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=R, num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size,
        seq_lens=seq_lens, dtype=dtype,
        query_start_loc=qsl, causal=causal, sliding_window_size=-1, isa=attn.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=impl.kv_cache_dtype,
    )  # fmt: skip
