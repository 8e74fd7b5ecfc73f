"""One decoder layer run on a token set, optionally attending to extra key/value-only tokens.

This is the single place where routed compute happens, and it is the backbone's own decoder layer:
the stock layer module runs (its norms, projections, q/k norms, rotary, residuals, MLP, and
transformers' attention dispatch, so `eager`, `sdpa` and any registered implementation behave as
stock), handed an explicit mask and a stand-in cache (`_Joined`) through the public Cache protocol:
its `update()` returns the extra keys/values followed by the layer's own. What that adds over the
stock call:
  - an explicit bias built from sequence order, so any subset of positions attends causally;
  - `extra`: tokens that contribute keys/values but issue no query and get no MLP (DPVR-KV's fixed
    image states, or a routed KV cache's past keys);
  - returning this layer's new keys/values (for the routed cache) and, on request, the attention
    probabilities of one query row per batch row (for FastV's ranking), without the full map.
Two small pieces are dpvr's own, for every verified family (`dpvr.routing.backbones`; others are
refused by name): keys/values of tokens that issue no query (`project_kv`) and FastV's one-row probe.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dpvr.attention import SDPA_LIKE
from dpvr.hf_compat import LAYER_CACHE_KWARG
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


def check_supported(layer: nn.Module) -> None:
    attn = getattr(layer, "self_attn", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
    parts = ("input_layernorm", "post_attention_layernorm", "mlp")
    if attn is None or not all(hasattr(attn, n) for n in needed) or not all(hasattr(layer, n) for n in parts):
        raise NotImplementedError(f"dpvr routing does not support decoder layer {type(layer).__name__}")


class _Joined:
    """The stand-in cache one routed attention call gets: `update()` (the Cache protocol's) returns the
    extra keys/values followed by the layer's own, already rotated, and keeps what the layer attended over."""

    def __init__(self, extra: KV | None, order: torch.Tensor, valid: torch.Tensor, keep: bool):
        self.extra, self.order, self.valid, self.keep = extra, order, valid, keep
        self.joined: KV | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        own = KV(key_states, value_states, self.order, self.valid)
        joined = own if self.extra is None else self.extra.then(own)
        if self.keep:  # else freed with the layer's own locals, before its MLP, as in a stock forward
            self.joined = joined
        return joined.key, joined.value


@contextlib.contextmanager
def _unchecked(layer: nn.Module):
    """transformers' layers checkpoint themselves when `gradient_checkpointing` is on, and then drop any
    cache they are handed; routing checkpoints its own stages (dpvr.routing.forward), so inside a routed
    call the layer's switch is off."""
    layer.gradient_checkpointing = False
    try:
        yield
    finally:
        layer.gradient_checkpointing = True


def _keys(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Un-rotated keys and values (B, H_kv, N, hd) of normed states x (B, N, D), k-norm included."""
    shape = (*x.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(x).view(shape)
    if hasattr(attn, "k_norm"):  # q/k-norm families normalise each head before rotary
        k = attn.k_norm(k)
    return k.transpose(1, 2), attn.v_proj(x).view(shape).transpose(1, 2)


def project_kv(
    layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values (B, H_kv, N, hd) of states h (B, N, D) through this layer's norm, k/v proj and rotary,
    and nothing else (no query: DPVR-KV's fixed image states issue none)."""
    k, v = _keys(layer.self_attn, layer.input_layernorm(h))
    # rotary on keys only: apply_rotary_pos_emb rotates a (q, k) pair, so pass k twice and keep one.
    # Every verified family rotates as Llama does (Qwen2-VL's rotary embedding folds its mrope axes into cos/sin).
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
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
    attn = layer.self_attn
    # Qwen2 sets sliding_window per layer on the module; Mistral reads it from the config
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
    mask_free = dense and window is None and (
        h.shape[1] == 1 or (extra is None and attn.config._attn_implementation in SDPA_LIKE)
    )
    bias = None
    if not mask_free:  # keys: extra's, then this call's own
        k_order = order if extra is None else torch.cat([extra.order, order], dim=1)
        k_valid = valid if extra is None else torch.cat([extra.valid, valid], dim=1)
        bias = attention_bias(order, valid, k_order, k_valid, h.dtype, sliding_window=window)
    keys = _Joined(extra, order, valid, keep=keep_keys or probe_rows is not None)
    # the switch is touched only when on: a generator context per layer call costs decode time
    checkpointed = getattr(layer, "gradient_checkpointing", False)
    orders = {}
    if getattr(attn, "_dpvr_contrast", None) is not None:  # contrastive attention (dpvr.contrast) maps keys to positions
        k_order = order if extra is None else torch.cat([extra.order, order], dim=1)
        k_valid = valid if extra is None else torch.cat([extra.valid, valid], dim=1)
        orders = {"dpvr_orders": (order, valid, k_order, k_valid)}
    with _unchecked(layer) if checkpointed else contextlib.nullcontext():
        out = layer(h, attention_mask=bias, position_embeddings=(cos, sin), **{LAYER_CACHE_KWARG: keys}, **orders)
    probs = None if probe_rows is None else _probe(layer, h, cos, sin, keys.joined, order, valid, probe_rows, window)
    return out, (keys.joined if keep_keys else None), probs


def _probe(layer, h, cos, sin, keys: KV, order, valid, rows, window) -> torch.Tensor:
    """Attention probabilities (B, H, N_keys) of one query row per batch row (FastV's ranking): that
    row's query against the keys the layer attended over, with its own one-row bias: O(H x N_keys)
    memory, any attention backend, and the layer itself may still run mask-free."""
    attn, B = layer.self_attn, h.shape[0]
    pick = rows.view(B, 1, 1)
    row_order, row_valid = order.gather(1, rows[:, None]), valid.gather(1, rows[:, None])  # (B, 1)
    x_row = layer.input_layernorm(h.gather(1, pick.expand(-1, 1, h.shape[-1])))  # (B, 1, D)
    q = attn.q_proj(x_row).view(B, 1, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    q = q.transpose(1, 2)  # (B, H, 1, hd)
    at = lambda t: t.gather(1, pick.expand(-1, 1, t.shape[-1]))  # noqa: E731 - the row's rotary angles
    q, _ = apply_rotary_pos_emb(q, q, at(cos), at(sin))
    k = keys.key.repeat_interleave(q.shape[1] // keys.key.shape[1], dim=1)  # (B, H, Nk, hd)
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling  # (B, H, 1, Nk)
    scores = scores + attention_bias(row_order, row_valid, keys.order, keys.valid, scores.dtype, sliding_window=window)
    return scores.softmax(-1)[:, :, 0]
