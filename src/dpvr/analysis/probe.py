"""An attention function that measures text-to-image attention mass and can block text-to-image
attention at chosen layers, while the layer output is still computed by sdpa.

    state = ProbeState.for_batch(input_ids, attention_mask, image_token_id, num_layers, measure_mass=True)
    with probing(model, state):
        model.model(input_ids=..., pixel_values=..., attention_mask=..., position_ids=...)
    state.mass_tensor()   # (L, B, H) share of each text query's attention on image keys, mean over queries

How: transformers dispatches every decoder attention through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`
and builds the mask with `ALL_MASK_ATTENTION_FUNCTIONS[...]`. We register "dpvr_probe" in both and switch only the
language model's config to it inside `probing` (the vision tower keeps its own). The probe sees one layer at a
time (`module.layer_idx`), scores only the text-query rows (memory O(T_text x T) per layer, never an attention map
of the whole model), reduces them to per-head scalars at once, and hands the real work to stock sdpa.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from dpvr.errors import DPVRError

PROBE = "dpvr_probe"


@dataclass
class ProbeState:
    """Token types of the batch being probed, what to block, and where the measured mass goes."""

    image: torch.Tensor  # (B, T) bool: image-token positions (these are the image keys)
    text: torch.Tensor  # (B, T) bool: real (unpadded) non-image positions
    num_layers: int
    blocked: torch.Tensor | None = None  # (B, L) bool: block text query -> image key at layer l for row b
    measure_mass: bool = True
    # (B, T) bool query positions whose attention over every key (mean over heads and these queries) is kept
    # per layer: the ground-truth analysis reads where the answer's query looks in the image (`attention_truth`)
    attend_from: torch.Tensor | None = None
    # text queries that can see an image key (causal): the rows whose attention share is measured
    rows: torch.Tensor = field(init=False)  # (B, R) long, positions (padded with 0)
    row_valid: torch.Tensor = field(init=False)  # (B, R) bool
    mass: list[torch.Tensor | None] = field(init=False)  # per layer: (B, H) mean over rows, NaN if no row
    attention: list[torch.Tensor | None] = field(init=False)  # per layer: (B, K) mean probs of attend_from

    def __post_init__(self) -> None:
        if self.image.shape != self.text.shape or self.image.dim() != 2:
            raise DPVRError(f"ProbeState: image {tuple(self.image.shape)} and text {tuple(self.text.shape)} must be equal (B, T)")
        if self.blocked is not None and self.blocked.shape != (self.image.shape[0], self.num_layers):
            raise DPVRError(f"ProbeState.blocked has shape {tuple(self.blocked.shape)}, expected (B, L) = "
                            f"({self.image.shape[0]}, {self.num_layers})")  # fmt: skip
        sees_image = self.text & (self.image.long().cumsum(-1) > 0)  # (B, T): after the first image token
        R = max(int(sees_image.sum(-1).max()), 1)
        # stable sort puts the selected positions first, in order
        order = torch.sort((~sees_image).to(torch.int8), dim=-1, stable=True).indices[:, :R]  # (B, R)
        self.row_valid = torch.gather(sees_image, 1, order)
        self.rows = torch.where(self.row_valid, order, torch.zeros_like(order))
        self.mass = [None] * self.num_layers
        self.attention = [None] * self.num_layers

    @classmethod
    def for_batch(
        cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, num_layers: int, **kw
    ) -> "ProbeState":
        valid = attention_mask.bool()
        image = (input_ids == image_token_id) & valid
        return cls(image=image, text=valid & ~image, num_layers=num_layers, **kw)

    def mass_tensor(self) -> torch.Tensor:
        """(L, B, H) measured text-to-image mass; raises if some layer was not seen."""
        missing = [i for i, m in enumerate(self.mass) if m is None]
        if missing:
            raise DPVRError(f"probe saw no attention call for layers {missing}; is the model a LLaVA decoder?")
        return torch.stack(self.mass)  # type: ignore[arg-type]


_ACTIVE: ProbeState | None = None


def _causal(q_len: int, k_len: int, batch: int, device: torch.device) -> torch.Tensor:
    # (B, 1, Q, K) True where query i (aligned to the end of the keys) may see key j
    q = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    return (q >= torch.arange(k_len, device=device)[None, :]).expand(batch, 1, q_len, k_len)


def text_to_image_mass(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scaling: float, groups: int, state: ProbeState
) -> torch.Tensor:
    """(B, H) per head: mean over the text query rows of the softmax share on image keys."""
    B, H, _, Dh = query.shape
    rows = state.rows.to(query.device)
    q = torch.gather(query, 2, rows[:, None, :, None].expand(B, H, -1, Dh)).float()  # (B, H, R, Dh)
    k = repeat_kv(key, groups).float()  # (B, H, K, Dh)
    scores = q @ k.transpose(-1, -2) * scaling  # (B, H, R, K)
    seen = torch.gather(allowed, 2, rows[:, None, :, None].expand(B, allowed.shape[1], -1, allowed.shape[-1]))
    probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)  # masked keys get exactly 0
    image_k = state.image.to(query.device)[:, None, None, :].float()  # (B, 1, 1, K)
    share = (probs * image_k).sum(-1)  # (B, H, R)
    valid = state.row_valid.to(query.device)[:, None, :].float()  # (B, 1, R)
    count = valid.sum(-1)  # (B, 1)
    per_head = (share * valid).sum(-1) / count.clamp(min=1)  # (B, H)
    return per_head.masked_fill(count == 0, float("nan"))


def query_attention(query, key, allowed, scaling: float, groups: int, at: torch.Tensor) -> torch.Tensor:
    """(B, K) softmax attention over every key, mean over heads and over the query positions at[b]
    ((B, T) bool over the keys' positions); a NaN row where a row selects no query."""
    B, H, _, Dh = query.shape
    at = at.to(query.device)
    R = max(int(at.sum(-1).max()), 1)
    order = torch.sort((~at).to(torch.int8), dim=-1, stable=True).indices[:, :R]  # (B, R): selected positions first
    valid = torch.gather(at, 1, order)  # (B, R)
    q = torch.gather(query, 2, order[:, None, :, None].expand(B, H, R, Dh)).float()  # (B, H, R, Dh)
    scores = q @ repeat_kv(key, groups).float().transpose(-1, -2) * scaling  # (B, H, R, K)
    seen = torch.gather(allowed, 2, order[:, None, :, None].expand(B, allowed.shape[1], R, allowed.shape[-1]))
    probs = scores.masked_fill(~seen, float("-inf")).softmax(-1).mean(1)  # (B, R, K)
    probs = torch.where(valid[..., None], probs, torch.zeros_like(probs))  # padding rows may be all-masked (NaN)
    count = valid.sum(-1, keepdim=True)  # (B, 1)
    return (probs.sum(1) / count.clamp(min=1)).masked_fill(count == 0, float("nan"))


def probe_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Drop-in attention function: optional blocking + mass measurement, then stock sdpa."""
    state = _ACTIVE
    if state is None:  # model left switched to the probe outside `probing`: behave like sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    B, _, Q, _ = query.shape
    K = key.shape[2]  # with a cache the queries are the last Q of the K positions
    if state.image.shape != (B, K):
        raise DPVRError(f"layer {module.layer_idx}: ProbeState describes {tuple(state.image.shape)} tokens, "
                        f"the attention has batch {B} and {K} keys")  # fmt: skip
    if state.measure_mass and Q != K:
        raise DPVRError(f"layer {module.layer_idx}: measuring attention mass needs a full forward (no cache)")
    allowed = attention_mask if attention_mask is not None else _causal(Q, K, B, query.device)
    if allowed.dtype != torch.bool:  # an additive float mask (e.g. eager's): 0 = attend
        allowed = allowed == 0
    allowed = allowed.expand(B, 1, Q, K)
    layer = module.layer_idx
    if state.blocked is not None:
        rows_blocked = state.blocked[:, layer].to(query.device)  # (B,)
        if bool(rows_blocked.any()):
            text_q = state.text.to(query.device)[:, K - Q :, None]  # (B, Q, 1)
            image_k = state.image.to(query.device)[:, None, :]  # (B, 1, K)
            block = text_q & image_k & rows_blocked[:, None, None]  # (B, Q, K)
            allowed = allowed & ~block[:, None]
    if state.measure_mass:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        state.mass[layer] = text_to_image_mass(query, key, allowed, scale, module.num_key_value_groups, state)
        if state.attend_from is not None:
            state.attention[layer] = query_attention(query, key, allowed, scale, module.num_key_value_groups,
                                                     state.attend_from).cpu()  # fmt: skip
    return sdpa_attention_forward(module, query, key, value, allowed, dropout=dropout, scaling=scaling, **kwargs)


def _probe_mask(*args, **kwargs):
    # always materialise the (B, 1, Q, K) bool mask: the probe edits it and reads text rows from it
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(PROBE, probe_attention)
AttentionMaskInterface.register(PROBE, _probe_mask)
assert PROBE in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


@contextlib.contextmanager
def probing(model, state: ProbeState) -> Iterator[ProbeState]:
    """Route the language model's attention through the probe for the duration of the block."""
    global _ACTIVE
    config = model.model.language_model.config
    if getattr(config, "num_hidden_layers", None) != state.num_layers:
        raise DPVRError(f"ProbeState has {state.num_layers} layers, the model {config.num_hidden_layers}")
    if _ACTIVE is not None:
        raise DPVRError("probing() is already active (nested probes are not supported)")
    previous = config._attn_implementation
    config._attn_implementation = PROBE
    _ACTIVE = state
    try:
        yield state
    finally:
        _ACTIVE = None
        config._attn_implementation = previous
