"""Training-free contrastive attention over image tokens (issue 41, item 5): an inference option.

    with contrast(model, ContrastConfig(early_layer=9, layers=(13, 14, 15), strength=1.0)):
        model.generate(...)

The related paper's observation: text-to-image attention keeps a persistent high-attention noise on
irrelevant image regions at every depth, while attention on text-aligned regions grows with depth.
So the *change* of the attention over the image between an early fusion layer and a late layer
highlights the regions that matter. In each contrasted layer l, text query t's logit over image key
j gets the bias

    strength * (log a_l(t, j) - log a_early(t, j))

where a_x(t, .) is the distribution over image tokens of the head-mean text-to-image attention in
layer x, accumulated over the text queries up to and including t (renormalised over image tokens),
taken from layer x's own (unbiased) logits in the same forward. The new attention is thus
proportional to a_l * (a_l / a_early) ** strength over the image: persistent noise (high in both)
is damped, growth is amplified. Image queries, text keys and prompts without images are untouched.

Why a causal running mean: the bias of query t depends on tokens <= t only, so the model stays a
causal LM and a cached generation equals a full recompute exactly in math (the running sums of each
watched layer are carried from the prefill into decode).

It is an attention function registered through transformers' public `AttentionInterface` (one per
base implementation: sdpa, eager, dpvr's fp32 sdpa), so it runs inside the stock decoder layers of
vanilla and of every routed mode alike; routed layers hand it the sequence order of their queries
and keys (`dpvr.routing.layer`), the stock forward's are inferred. A layer that sees no image key
(LF's text-only layers, VTW's after the withdrawal) is left as it is. Documented in docs/contrastive.md.
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dpvr.attention import CONTRAST_OF
from dpvr.errors import DPVRError
from dpvr.hf_compat import STOCK_CACHE_KWARG

EPS = 1e-6  # floor of a distribution entry before the log: caps |bias| at strength * log(1 / EPS) ~ 14 x strength
ORDERS_KWARG = "dpvr_orders"  # (q_order, q_valid, k_order, k_valid) that routed layers pass to the attention call


@dataclass(frozen=True)
class ContrastConfig:
    early_layer: int  # the early-fusion layer whose attention is the reference (`dpvr analyze`'s masking curve)
    layers: tuple[int, ...]  # the layers whose text-to-image logits are re-weighted, all deeper than early_layer
    strength: float = 1.0  # 0: the mechanism runs and changes nothing

    def validate_for(self, num_layers: int) -> None:
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or not math.isfinite(self.strength):
            raise DPVRError(f"contrast strength must be a finite number, got {self.strength!r}")
        if not isinstance(self.early_layer, int) or not 0 <= self.early_layer < num_layers:
            raise DPVRError(f"contrast early_layer must be in [0, {num_layers}), got {self.early_layer!r}")
        if not self.layers:
            raise DPVRError("contrast layers: name at least one layer to re-weight")
        bad = [i for i in self.layers if not isinstance(i, int) or not self.early_layer < i < num_layers]
        if bad:
            raise DPVRError(f"contrast layers {bad} out of range: each must be in ({self.early_layer}, {num_layers}), "
                            "deeper than early_layer")  # fmt: skip
        if len(set(self.layers)) != len(self.layers):
            raise DPVRError(f"contrast layers {list(self.layers)} name a layer twice")


class _Run:
    """What one sequence's forwards share: the prompt's image positions and each watched layer's running
    sums of text-to-image attention (B, T0) over prompt positions, carried from prefill into decode."""

    def __init__(self, cfg: ContrastConfig, image_token_id: int):
        self.cfg, self.image_token_id = cfg, image_token_id
        self.is_img: torch.Tensor | None = None  # (B, T0) of the prompt
        self.valid: torch.Tensor | None = None  # (B, past + n) of the current forward
        self.past = 0
        self.sums: dict[int, torch.Tensor] = {}
        self.early: torch.Tensor | None = None  # (B, n, T0) early layer's cumulative sums at this forward's positions

    def start(self, input_ids: torch.Tensor | None, attention_mask, past: int) -> None:
        """Called before every forward of the model (a forward pre-hook): prefill (past 0) starts afresh."""
        if input_ids is None:
            raise DPVRError("contrastive attention needs input_ids (to find the image tokens), not inputs_embeds")
        if past == 0:
            self.is_img, self.sums = input_ids == self.image_token_id, {}
        elif self.is_img is None or self.is_img.shape[0] != input_ids.shape[0]:
            raise DPVRError("contrastive attention: a decode step without its prompt's prefill under the same contrast")
        B, n = input_ids.shape
        self.valid = attention_mask.bool() if attention_mask is not None else torch.ones(
            B, past + n, dtype=torch.bool, device=input_ids.device)  # fmt: skip
        self.past, self.early = past, None

    @property
    def active(self) -> bool:
        return self.is_img is not None and bool(self.is_img.any())


def _stock_orders(run: _Run, nq: int, nk: int, device) -> tuple[torch.Tensor, ...]:
    """The stock forward's queries are the newest nq positions and its keys every position so far."""
    B = run.valid.shape[0]
    q_order = (nk - nq + torch.arange(nq, device=device)).expand(B, nq)
    k_order = torch.arange(nk, device=device).expand(B, nk)
    return q_order, run.valid[:, nk - nq : nk], k_order, run.valid[:, :nk]


def _additive(mask, q_order, k_order, k_valid, dtype) -> torch.Tensor:
    """The layer's mask as an additive (B, 1|H, Nq, Nk) bias; None (sdpa's is_causal, a lone decode query)
    means causal over the given orders."""
    if mask is None:
        mask = k_valid[:, None, None, :] & (k_order[:, None, None, :] <= q_order[:, None, :, None])
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def _image_attention(module, query, key, mask, img_key, text_q, k_idx, t0) -> torch.Tensor:
    """(B, Nq, T0): head-mean attention probability of each text query on each prompt image position."""
    k = repeat_kv(key, query.shape[1] // key.shape[1])
    logits = (query.float() @ k.float().transpose(-1, -2)) * module.scaling + mask.float()
    probs = logits.softmax(-1).mean(1) * img_key[:, None, :]  # (B, Nq, Nk)
    out = torch.zeros(*probs.shape[:2], t0, dtype=probs.dtype, device=probs.device)
    return out.scatter_add(2, k_idx[:, None, :].expand_as(probs), probs) * text_q[..., None]


def _log_dist(cum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log of the running sums renormalised over image positions (floored at EPS), and which rows have any."""
    total = cum.sum(-1, keepdim=True)
    return (cum / total.clamp_min(1e-30)).clamp_min(EPS).log(), total > 0


def _watch(run: _Run, module, query, key, mask, orders) -> torch.Tensor | None:
    """Update this layer's running sums; for a contrasted layer return the additive bias (B, 1, Nq, Nk)."""
    i = module.layer_idx
    q_order, q_valid, k_order, k_valid = orders or _stock_orders(run, query.shape[2], key.shape[2], query.device)
    t0 = run.is_img.shape[1]
    in_prompt = lambda order: order < t0  # noqa: E731 - generated tokens are text
    k_idx = k_order.clamp(max=t0 - 1)
    img_key = k_valid & in_prompt(k_order) & run.is_img.gather(1, k_idx)  # (B, Nk)
    if not bool(img_key.any()):  # this layer attends to no image token under its routing
        return None
    text_q = q_valid & ~(in_prompt(q_order) & run.is_img.gather(1, q_order.clamp(max=t0 - 1)))  # (B, Nq)
    mask = _additive(mask, q_order, k_order, k_valid, query.dtype)
    cum = _image_attention(module, query, key, mask, img_key, text_q, k_idx, t0).cumsum(1)
    if i in run.sums:  # decode: the prefill's (and earlier steps') queries come first
        cum = cum + run.sums[i][:, None, :]
    run.sums[i] = cum[:, -1]  # filler/image query rows add nothing, so the last row holds the total
    # layers may run on different query sets (all tokens early, text only late): rows meet by sequence position
    rows = (q_order - run.past)[..., None].expand_as(cum)  # (B, Nq, T0) this forward's query positions
    if i == run.cfg.early_layer:
        run.early = torch.zeros(cum.shape[0], run.valid.shape[1] - run.past, cum.shape[2], dtype=cum.dtype,
                                device=cum.device).scatter(1, rows, cum)  # fmt: skip
        return None
    if run.early is None:  # the early layer saw no image key (e.g. VTW withdrew them before it)
        return None
    late, has_late = _log_dist(cum)
    early, has_early = _log_dist(run.early.gather(1, rows))
    per_pos = run.cfg.strength * (late - early) * (has_late & has_early)  # (B, Nq, T0)
    bias = per_pos.gather(2, k_idx[:, None, :].expand(-1, per_pos.shape[1], -1))
    bias = bias * (img_key[:, None, :] & text_q[:, :, None])
    return mask + bias[:, None].to(mask.dtype)


def _base_function(module, base_name: str):
    """The implementation contrast wraps; eager is not registered globally: each family's modeling file
    has its own `eager_attention_forward`, which its attention module falls back to, as here."""
    if base_name != "eager":
        return ALL_ATTENTION_FUNCTIONS[base_name]
    return sys.modules[type(module).__module__].eager_attention_forward


def _contrast_attention(base_name: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        orders = kwargs.pop(ORDERS_KWARG, None)
        base = _base_function(module, base_name)
        run: _Run | None = getattr(module, "_dpvr_contrast", None)  # None: a side branch's layer, or contrast off
        watched = run is not None and run.active and module.layer_idx in (run.cfg.early_layer, *run.cfg.layers)
        if watched:
            biased = _watch(run, module, query, key, attention_mask, orders)
            if biased is not None:
                attention_mask = biased
        return base(module, query, key, value, attention_mask, **kwargs)

    return attention


for _base, _name in CONTRAST_OF.items():
    AttentionInterface.register(_name, _contrast_attention(_base))
    AttentionMaskInterface.register(_name, ALL_MASK_ATTENTION_FUNCTIONS["eager" if _base == "eager" else "sdpa"])


def _past_length(kwargs: dict) -> int:
    """Positions the forward's cache has seen (0: a prefill). Its keyword is the installed transformers' name."""
    cache = kwargs.get(STOCK_CACHE_KWARG, kwargs.get("past_key_values"))
    return int(cache.get_seq_length()) if cache is not None else 0


@contextlib.contextmanager
def contrast(model, cfg: ContrastConfig | None):
    """Run `model` (stock or DPVR, any mode) with contrastive attention inside this block; None: as it is."""
    if cfg is None:
        yield model
        return
    layers = model.model.language_model.layers
    cfg.validate_for(len(layers))
    text_config = model.config.text_config
    impl = text_config._attn_implementation
    if impl in CONTRAST_OF.values():  # one state per model: a second block would mix two runs' sums
        raise DPVRError("contrast(model, ...) blocks do not nest: this model already runs under one")
    if impl not in CONTRAST_OF:
        raise DPVRError(f"contrastive attention runs on {', '.join(CONTRAST_OF)}, not attn_implementation={impl!r}")
    run = _Run(cfg, model.config.image_token_id)

    def pre_hook(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        run.start(input_ids, kwargs.get("attention_mask"), _past_length(kwargs))

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    for layer in layers:
        layer.self_attn._dpvr_contrast = run
    text_config._attn_implementation = CONTRAST_OF[impl]
    try:
        yield model
    finally:
        text_config._attn_implementation = impl
        for layer in layers:
            del layer.self_attn._dpvr_contrast
        handle.remove()
