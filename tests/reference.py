"""Naive reference for every routing mode: each layer runs over the FULL sequence with the stock
decoder-layer forward and an explicit 4D mask; nothing is gathered, skipped or cached.

It shares no code with dpvr.routing: masks are built here from token types, FastV's ranking comes
from the eager attention weights the stock attention module returns. Slow and wasteful on purpose.
"""
from __future__ import annotations

import torch

from dpvr.config import DPVRConfig


def stock_inputs(model, input_ids, pixel_values=None, attention_mask=None, **vision):
    """(merged input embeddings, position ids or None) exactly as the stock model hands them to its
    language model: captured from the family's own forward (image merge, anyres, multimodal rope)."""
    seen = {}

    def grab(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], pos=kwargs.get("position_ids"))

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, use_cache=False,
                    **vision)  # fmt: skip
    finally:
        handle.remove()
    return seen["embeds"], seen["pos"]


def _bias(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """allowed (B, T, T) bool -> additive (B, 1, T, T); rows with nothing allowed see only themselves."""
    eye = torch.eye(allowed.shape[-1], dtype=torch.bool)[None]
    allowed = torch.where(allowed.any(-1, keepdim=True), allowed, eye)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def reference_logits(model, side_branch, cfg: DPVRConfig, input_ids, pixel_values=None, attention_mask=None, edit=None,
                     **vision):  # fmt: skip
    """Logits (B, T, V) of `cfg` computed naively. `model` has a stock vision-language model's modules
    (`model.model`, `lm_head`); `vision` holds the family's image inputs (image_sizes, image_grid_thw, ...).
    edit(i, module, h, bias, cos_sin) -> bias: changes decoder layer i's additive (B, 1, T, T) mask
    (test_contrast.py's naive contrastive attention)."""
    lm = model.model.language_model
    B, T = input_ids.shape
    valid = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    h, pos = stock_inputs(model, input_ids, pixel_values, attention_mask, **vision)
    if pos is None:  # 1-D rope: the stock arange, shifted to start at each row's first real token (rotary
        # attention sees differences only); under left padding that counts real tokens, as generate() does
        pos = (torch.arange(T) - valid.long().argmax(1, keepdim=True)).masked_fill(~valid, 0)
    is_img = (input_ids == model.config.image_token_id) & valid
    is_txt = valid & ~is_img
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None]  # (1, T, T) query i sees key j <= i
    dt = h.dtype
    cos_sin = lm.rotary_emb(h, pos)

    def layer(i_or_module, h, allowed):
        module = lm.layers[i_or_module] if isinstance(i_or_module, int) else i_or_module
        bias = _bias(allowed, dt)
        if edit is not None and isinstance(i_or_module, int):
            bias = edit(i_or_module, module, h, bias, cos_sin)
        return module(h, attention_mask=bias, position_ids=pos, position_embeddings=cos_sin)

    def masks(valid):
        full = causal & valid[:, None, :]
        txt_v, img_v = is_txt & valid, is_img & valid
        text_only = full & txt_v[:, :, None] & txt_v[:, None, :]  # text queries, text keys
        img_only = full & img_v[:, :, None] & img_v[:, None, :]  # image queries, image keys
        return full, text_only, img_only

    def fastv_keep(h, valid):
        """Valid mask after dropping the image tokens the last token attends to least (eager weights)."""
        attn = lm.layers[cfg.fastv_layer].self_attn
        assert attn.config._attn_implementation == "eager", "the FastV reference reads eager attention weights"
        normed = lm.layers[cfg.fastv_layer].input_layernorm(h)
        _, weights = attn(normed, position_embeddings=cos_sin, attention_mask=_bias(masks(valid)[0], dt))
        keep = valid.clone()
        for b in range(B):
            last = int(valid[b].nonzero().max())
            score = weights[b, :, last].mean(0)  # head-mean attention of the last token, (T,)
            img_pos = (is_img[b] & valid[b]).nonzero().flatten()
            n_drop = int(len(img_pos) * cfg.fastv_ratio)
            order = sorted(img_pos.tolist(), key=lambda p: -float(score[p]))  # stable: ties keep order
            keep[b, order[len(order) - n_drop :]] = False
        return keep

    L, s, K = len(lm.layers), cfg.split_layer, cfg.fusion_layers
    if not is_img.any() or cfg.mode == "vanilla":
        for i in range(L):
            h = layer(i, h, masks(valid)[0])
        return model.lm_head(lm.norm(h))

    prune = cfg.mode == "fastv" or cfg.shallow_fastv
    for i in range(L if cfg.mode == "fastv" else s):
        keep = fastv_keep(h, valid) if prune and i == cfg.fastv_layer else None
        h = layer(i, h, masks(valid)[0])
        if keep is not None:
            valid = keep  # dropped tokens are invisible as keys from the next layer on
    if cfg.mode == "fastv":
        return model.lm_head(lm.norm(h))
    full, text_only, img_only = masks(valid)
    is_img = is_img & valid
    side = h
    if cfg.has_side_branch and not cfg.is_lf_ideal:
        for module in side_branch:
            side = layer(module, side, img_only)
    img = is_img[..., None]
    if cfg.mode in ("vtw",) or cfg.is_lf_ideal:
        for i in range(s, L):
            h = layer(i, h, text_only)
    elif cfg.mode == "lf":
        # fusion layers: the last K, or sparse fusion's chosen ones. Every fusion layer whose previous
        # layer is not one starts again from the side branch's image states; the rest are text only.
        fusion = set(cfg.fusion_at) if cfg.fusion_at else set(range(L - K, L))
        for i in range(s, L):
            if i in fusion and i - 1 not in fusion:
                h = torch.where(img, side, h)
            h = layer(i, h, full if i in fusion else text_only)
    elif cfg.mode in ("pc", "kv"):
        # KV's contract (image states fixed at the side output, keys/values only) is, at text
        # positions, the same as resetting image positions before a full layer: image queries'
        # outputs are discarded by the next reset. So one naive reference serves both.
        for i in range(s, L):
            h = layer(i, torch.where(img, side, h), full)
    else:
        raise AssertionError(cfg.mode)
    return model.lm_head(lm.norm(h))
