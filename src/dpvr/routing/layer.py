"""One decoder layer run on a token set, optionally attending to extra key/value-only tokens.

This is the single place where routed compute happens. It reuses the stock layer's own modules
(norms, q/k/v/o projections, MLP) and transformers' attention interface, so `eager`, `sdpa` (and
any registered implementation) behave exactly as in the stock model. What it adds over calling the
layer directly:
  - an explicit bias built from sequence order, so any subset of positions attends causally;
  - `extra`: tokens that contribute keys/values but issue no query and get no MLP (DPVR-KV's fixed
    image states, or a routed KV cache's past keys);
  - returning this layer's new keys/values (for the routed cache) and, on request, the attention
    probabilities of one query row per batch row (for FastV's ranking), without the full map.
Supported layer families: Llama, Mistral, Qwen2 (same block structure; biases/sliding windows vary).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dpvr.errors import DPVRError
from dpvr.routing.tokens import attention_bias


@dataclass
class KV:
    """Keys/values of tokens that are only attended to: already rotated, with their order."""

    key: torch.Tensor  # (B, H_kv, N, hd)
    value: torch.Tensor  # (B, H_kv, N, hd)
    order: torch.Tensor  # (B, N) long: sequence index, for causality
    valid: torch.Tensor  # (B, N) bool

    def then(self, later: KV) -> KV:
        """These keys/values followed by `later`'s along the sequence axis."""
        return KV(
            torch.cat([self.key, later.key], dim=2),
            torch.cat([self.value, later.value], dim=2),
            torch.cat([self.order, later.order], dim=1),
            torch.cat([self.valid, later.valid], dim=1),
        )


def _rotary_fn(attn: nn.Module) -> Callable:
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def _eager_fallback(attn: nn.Module) -> Callable:
    return sys.modules[type(attn).__module__].eager_attention_forward


def check_supported(layer: nn.Module) -> None:
    attn = getattr(layer, "self_attn", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or not all(hasattr(attn, n) for n in needed) or not hasattr(layer, "mlp"):
        raise NotImplementedError(f"dpvr routing does not support decoder layer {type(layer).__name__}")
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        raise NotImplementedError(f"dpvr routing does not support q/k-norm attention ({type(attn).__name__}) yet")
    try:
        _rotary_fn(attn), _eager_fallback(attn)
    except AttributeError as exc:
        raise NotImplementedError(f"dpvr routing does not support {type(attn).__name__}: {exc}") from None


def project_kv(
    layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values (B, H_kv, N, hd) of states h (B, N, D) through this layer's norm, k/v proj and rotary."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    # rotary on keys only: apply_rotary_pos_emb rotates a (q, k) pair, so pass k twice and keep one
    k, _ = _rotary_fn(attn)(k, k, cos, sin)
    return k, v


def routed_layer(
    layer: nn.Module,
    h: torch.Tensor,  # (B, N, D) states of the query tokens
    order: torch.Tensor,  # (B, N) sequence index of each query token
    valid: torch.Tensor,  # (B, N) bool
    cos: torch.Tensor,  # (B, N, hd) rotary tables at the query tokens' position ids
    sin: torch.Tensor,
    extra: KV | None = None,  # key/value-only tokens (no query, no MLP)
    probe_rows: torch.Tensor | None = None,  # (B,) long: return this query row's attention probabilities
    dense: bool = False,  # caller guarantees: all keys valid, extra keys precede queries, order ascending
    keep_keys: bool = True,  # return the keys/values (a cache needs them); else None, freed before the MLP
) -> tuple[torch.Tensor, KV | None, torch.Tensor | None]:
    """Returns (new h (B, N, D), the keys/values it attended over (extra's, then this call's: what a
    cache keeps for this layer) or None, probe probabilities (B, H, N_keys) or None).

    With `dense`, the explicit bias is skipped where the backend's own causal handling is exactly
    right: a single query (it sees every key), or sdpa without extra keys (is_causal, which sdpa
    aligns top-left, correct only when queries and keys are the same tokens). This is what lets
    sdpa pick its flash/efficient kernels, as in the stock model.
    """
    out, keys, probs = _attention(layer, h, order, valid, cos, sin, extra, probe_rows, dense)
    h = h + out
    del out
    if not keep_keys:
        # as in the stock layer, queries/keys/values are freed before the MLP allocates, so a routed
        # prefill peaks no higher than the stock one (held across it, LF's peaked 1.25x vanilla's)
        keys = None
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, keys, probs


def _attention(layer, h, order, valid, cos, sin, extra, probe_rows, dense):
    """Self-attention of routed_layer: (o_proj output (B, N, D), keys/values attended over, probe probs)."""
    attn = layer.self_attn
    B, N, _ = h.shape
    x = layer.input_layernorm(h)
    shape = (B, N, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)  # (B, H, N, hd)
    k = attn.k_proj(x).view(shape).transpose(1, 2)  # (B, H_kv, N, hd)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = _rotary_fn(attn)(q, k, cos, sin)
    own = KV(k, v, order, valid)
    # every key this call attends over: extra first (past/fixed context), then this call's tokens
    keys = own if extra is None else extra.then(own)
    k_all, v_all = keys.key, keys.value

    # Qwen2 sets sliding_window per layer on the module; Mistral reads it from the config
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
    implementation = attn.config._attn_implementation
    mask_free = dense and window is None and probe_rows is None and (
        N == 1 or (extra is None and implementation == "sdpa")
    )
    bias = None if mask_free else attention_bias(order, valid, keys.order, keys.valid, q.dtype, sliding_window=window)

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, _eager_fallback(attn))
    out, _ = interface(
        attn,
        q,
        k_all,
        v_all,
        bias,
        dropout=0.0 if not attn.training else attn.attention_dropout,
        scaling=attn.scaling,
    )
    out = attn.o_proj(out.reshape(B, N, -1))

    probs = None
    if probe_rows is not None:  # one query row per batch row: O(H x N_keys) memory, any attention backend
        rows = probe_rows.view(B, 1, 1, 1).expand(-1, q.shape[1], 1, q.shape[-1])
        q_row = q.gather(2, rows)  # (B, H, 1, hd)
        k_rep = k_all.repeat_interleave(q.shape[1] // k_all.shape[1], dim=1)  # (B, H, Nk, hd)
        scores = (q_row @ k_rep.transpose(-1, -2)).float() * attn.scaling  # (B, H, 1, Nk)
        scores = scores + bias.gather(2, probe_rows.view(B, 1, 1, 1).expand(-1, 1, 1, bias.shape[-1])).float()
        probs = scores.softmax(-1)[:, :, 0]  # (B, H, Nk)
    return out, keys, probs
