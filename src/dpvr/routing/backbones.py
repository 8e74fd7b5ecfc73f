"""The backbone seam: what differs between the vision-language families dpvr routes.

Routing itself (`dpvr.routing.forward`) only needs the merged input embeddings, which positions are
image tokens, the position ids and the language model's decoder layers. Each family gets there its
own way; this table says how, in the style of PEFT's per-model-type tables:

  - the image features come from the stock model's own `get_image_features`, handed the family's
    vision inputs (LLaVA-NeXT / OneVision anyres: `image_sizes`, newline tokens included in the
    features; Qwen2-VL: `image_grid_thw`, a variable token count per image);
  - positions are 1-D (LLaVA family: counted over real tokens, as `generate` does under left padding)
    or Qwen2-VL's multimodal rope (3, B, T) from the model's own `get_rope_index`, continued while
    decoding by each row's rope delta (kept in the RoutedCache).

Adding a family is one entry here, a tiny config in `tests/families.py` and the tests walking it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from dpvr.errors import DPVRError

# a converted model's config has model_type DPVR_PREFIX + the stock one (e.g. dpvr_llava): its own, so
# a stock loader never silently drops the side branch
DPVR_PREFIX = "dpvr_"
_LLAVA_VISION = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")
# Text models whose decoder layer dpvr.routing.layer reproduces exactly, each verified in every mode by
# tests/test_backbones.py (text-only outputs equal the stock model's, with biases, head_dim and sliding
# windows off their defaults) or tests/test_families.py. Every other text model is refused by name:
# layers that merely look alike convert silently and compute something else (gemma2's extra norms and
# soft-capping, granite's multipliers, qwen2_moe's and smollm3's layers) or crash later (cohere,
# helium, stablelm).
_LLAVA_TEXT = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Backbone:
    stock: type[PreTrainedModel]  # the stock ...ForConditionalGeneration class
    text_models: tuple[str, ...]  # text_config.model_type values verified exact
    vision_inputs: tuple[str, ...]  # forward kwargs its get_image_features takes besides pixel_values
    mrope: bool = False  # Qwen2-VL's 3-axis rope positions (else 1-D)
    vision_encoder: str = "vision_tower"  # under the stock `.model`: the image encoder ...
    projector: str = "multi_modal_projector"  # ... and what maps its features into the text (inside it for Qwen2-VL)

    @property
    def model_type(self) -> str:
        return self.stock.config_class.model_type

    @property
    def patch_grids(self) -> bool:
        """Images arrive as flattened patches with a (t, h, w) grid each (Qwen2-VL), not as crops."""
        return "image_grid_thw" in self.vision_inputs


BACKBONES: dict[str, Backbone] = {b.model_type: b for b in (
    Backbone(LlavaForConditionalGeneration, _LLAVA_TEXT, _LLAVA_VISION),
    Backbone(LlavaNextForConditionalGeneration, _LLAVA_TEXT, _LLAVA_VISION),
    Backbone(LlavaOnevisionForConditionalGeneration, _LLAVA_TEXT,
             (*_LLAVA_VISION, "vision_aspect_ratio", "batch_num_images")),
    Backbone(Qwen2VLForConditionalGeneration, ("qwen2_vl_text",), ("image_grid_thw",), mrope=True,
             vision_encoder="visual", projector="visual.merger"),
    Backbone(Qwen2_5_VLForConditionalGeneration, ("qwen2_5_vl_text",), ("image_grid_thw",), mrope=True,
             vision_encoder="visual", projector="visual.merger"),
)}  # fmt: skip


def backbone_of(model_or_config) -> Backbone:
    """The table entry for a stock or converted (dpvr_...) model or config, or a one-line refusal
    naming the type."""
    config = getattr(model_or_config, "config", model_or_config)
    given = getattr(config, "model_type", None)
    model_type = str(given).removeprefix(DPVR_PREFIX)
    if model_type not in BACKBONES:
        raise NotImplementedError(f"dpvr routes {', '.join(BACKBONES)} models; got model_type {given!r}")
    return BACKBONES[model_type]


def freeze_vision_encoder(model) -> None:
    """Freeze the image encoder but not the projector: LLaVA's fine-tuning stage (and the usual Qwen2-VL
    one) trains the language model and the projector only."""
    b = backbone_of(model)
    model.model.get_submodule(b.vision_encoder).requires_grad_(False)
    model.model.get_submodule(b.projector).requires_grad_(True)


def check_text_model(backbone: Backbone, text_config) -> None:
    """Refuse, by name, a text model type not verified exact for this family."""
    model_type = getattr(text_config, "model_type", None)
    if model_type not in backbone.text_models:
        raise DPVRError(f"dpvr routing does not support text model type {model_type!r} in {backbone.model_type} "
                        f"(verified exact: {', '.join(backbone.text_models)}): its decoder layer differs from the routed one")  # fmt: skip


def image_features(model, backbone: Backbone, pixel_values, inputs: dict) -> tuple[torch.Tensor | None, int]:
    """(All images' features in prompt order (N_image_tokens, D), the number of images), from the stock
    get_image_features, or from `mm_encoder_outputs` (generate() encodes the images once, up front,
    for models whose forward takes them); (None, 0) without images."""
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
    if encoded is None and pixel_values is None:
        return None, 0
    if encoded is None:
        given = {k: inputs[k] for k in backbone.vision_inputs if inputs.get(k) is not None}
        encoded = model.model.get_image_features(pixel_values=pixel_values, **given, return_dict=True)
    feats = encoded.pooler_output
    return torch.cat(list(feats), dim=0), len(feats)


def sequence_positions(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) positions: each token's index less its row's first real token's (masked tokens get 0).
    Under left padding that counts real tokens, as generate() does; a masked token inside a prompt
    keeps its place, as in the stock forward's arange: counting over it would move every later token
    one closer to the earlier ones and change the text's output. Rotary attention sees differences
    only, so the stock arange and these give the same result."""
    B, T = valid.shape
    index = torch.arange(T, device=valid.device).expand(B, T)
    if bool(valid.all()):
        return index
    first = valid.long().argmax(1, keepdim=True)  # the first real token of each row (rows are never empty)
    return (index - first).masked_fill(~valid, 0)


def _given_positions(backbone: Backbone, position_ids: torch.Tensor, B: int, n: int) -> torch.Tensor:
    """User/generate-given position ids -> (B, n), or (3, B, n) under mrope. generate() hands Qwen2-VL
    (4, B, n) (text positions first, then the three rope axes) or one axis (1, B, n) while decoding."""
    p, shape = position_ids, tuple(position_ids.shape)
    want = f"(3, B, T), (4, B, T) or (B, T) with B={B}, T={n}" if backbone.mrope else f"(B, T)=({B}, {n}) or (1, {n})"
    fits = p.dim() in ((2, 3) if backbone.mrope else (2,)) and p.shape[-1] == n and p.shape[-2] in (1, B)
    if fits and p.dim() == 3:
        fits = p.shape[0] in (1, 3, 4)
    if not fits:
        raise DPVRError(f"position_ids must be {want}, got shape {shape}")
    if not backbone.mrope:
        return p.expand(B, n)
    p = p[None] if p.dim() == 2 else p
    p = p[1:] if p.shape[0] == 4 else p  # generate()'s text positions row (for packed masks) is not a rope axis
    return p.expand(3, B, n)


def prefill_positions(model, backbone: Backbone, input_ids, valid, position_ids, inputs: dict):
    """(positions (B, T) or (3, B, T), rope deltas (B, 1) or None) for a prompt."""
    B, T = input_ids.shape
    if position_ids is not None:
        pos = _given_positions(backbone, position_ids, B, T)
    elif backbone.mrope and inputs.get("image_grid_thw") is not None:
        types = inputs.get("mm_token_type_ids")
        if types is None:  # what the processor returns: 1 on image tokens (videos are refused)
            types = (input_ids == model.config.image_token_id).int()
        pos, _ = model.model.get_rope_index(input_ids, types, image_grid_thw=inputs["image_grid_thw"],
                                            attention_mask=valid.long())  # fmt: skip
    else:
        pos = sequence_positions(valid)
        pos = pos[None].expand(3, B, T) if backbone.mrope else pos
    if not backbone.mrope:
        return pos, None
    # each row's offset between its next rope position and its token count, as get_rope_index defines it
    top = pos.masked_fill(~valid[None], torch.iinfo(pos.dtype).min).amax(dim=(0, 2))
    return pos, (top + 1 - valid.sum(1))[:, None]


def decode_positions(backbone: Backbone, full_valid, n: int, position_ids, rope_deltas) -> torch.Tensor:
    """Positions of n new tokens after a cached prompt; full_valid (B, seen + n) covers both."""
    B = full_valid.shape[0]
    if position_ids is not None:
        return _given_positions(backbone, position_ids, B, n)
    pos = sequence_positions(full_valid)[:, -n:]  # as the prompt's were counted
    if not backbone.mrope:
        return pos
    # rope deltas are taken against the real-token count (get_rope_index counts over real tokens only)
    pos = (full_valid.long().cumsum(-1) - 1)[:, -n:]
    return (pos + rope_deltas.to(pos.device))[None].expand(3, B, n)
