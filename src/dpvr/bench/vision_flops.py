"""Vision-side FLOPs and image-token counts per family (torch.utils.flop_counter's convention: 2 x
multiply-adds of matmuls and convolutions, attention included, norms and elementwise work not).

An image is given by its size: (height, width) in pixels for the LLaVA family (LLaVA-1.5 resizes to
its tower's square; LLaVA-NeXT / OneVision tile it by `image_grid_pinpoints`, anyres) and its patch
grid (t, h, w) for Qwen2-VL / Qwen2.5-VL (`image_grid_thw`; a 448x448 image is (1, 32, 32)).
How many language-model tokens an anyres image becomes (unpadding, newline tokens, OneVision's
anyres_max downsampling) is asked of the stock model's own code, on a shape twin with a one-layer,
8-wide tower: the count depends only on the geometry, and so cannot drift from what the model does.
"""
from __future__ import annotations

import functools
import math


def backbone_of(config):
    """The family's row of the backbone table (imported here, on use: `dpvr flops --help` needs no transformers)."""
    from dpvr.routing.backbones import backbone_of as row

    return row(config)


def linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def family(config) -> str:
    """The stock model_type of a config, a converted (dpvr_...) one included."""
    return backbone_of(config).model_type


def patch_grids(config) -> bool:
    """Qwen2-VL / Qwen2.5-VL: an image is a (t, h, w) patch grid, not a crop."""
    return backbone_of(config).patch_grids


def _vit_layer(S: int, D: int, intermediate: int, mlp_mats: int = 2) -> int:
    """One pre-norm ViT block on S tokens: q, k, v, o projections, full attention, an MLP of mlp_mats matrices."""
    return 4 * linear(S, D, D) + 4 * S * S * D + mlp_mats * linear(S, D, intermediate)


def _tower_on_crop(config) -> tuple[int, int]:
    """(FLOPs of the CLIP/SigLIP tower + projector on one crop, features per crop) for the LLaVA family."""
    v, t = config.vision_config, config.text_config.hidden_size
    patches = (v.image_size // v.patch_size) ** 2
    cls_token = v.model_type == "clip_vision_model"
    S, D = patches + cls_token, v.hidden_size
    conv = 2 * patches * D * 3 * v.patch_size**2
    head = 0
    # SigLIP's attention-pooling head (one probe query) runs unless the config turns it off; before
    # transformers 5.23 the config had no such field and the model ran it always, hence the default
    if v.model_type == "siglip_vision_model" and getattr(v, "vision_use_head", True):
        head = 2 * linear(S, D, D) + 2 * linear(1, D, D) + 4 * S * D + 2 * linear(1, D, v.intermediate_size)
    n_feat = patches if (config.vision_feature_select_strategy == "default" and cls_token) else S
    projector = linear(n_feat, D, t) + linear(n_feat, t, t)
    return conv + v.num_hidden_layers * _vit_layer(S, D, v.intermediate_size) + head + projector, n_feat


def crops(config, size, n_images: int) -> int:
    """Tower inputs an anyres image becomes: the base view plus its tiles (OneVision: base only when a
    prompt holds several images)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    if family(config) == "llava" or (family(config) == "llava_onevision" and n_images > 1):
        return 1
    return image_size_to_num_patches(list(size), config.image_grid_pinpoints, config.vision_config.image_size)


def _qwen_vision(config, grid) -> int:
    """Qwen2-VL / Qwen2.5-VL tower on one image's (t, h, w) patch grid, merger included."""
    v = config.vision_config
    t, h, w = grid
    N, m = t * h * w, v.spatial_merge_size
    qwen25 = family(config) == "qwen2_5_vl"
    D = v.hidden_size if qwen25 else v.embed_dim
    conv = 2 * N * D * v.in_channels * v.temporal_patch_size * v.patch_size**2
    frame = h * w  # attention runs per frame (cu_seqlens), or per window in Qwen2.5-VL's windowed blocks
    full_attn = 4 * D * t * frame**2
    if qwen25:
        win = v.window_size // m // v.patch_size  # in merged units, windows tiled from the top-left
        H, W = h // m, w // m
        sides = lambda n: [min(win, n - i) for i in range(0, n, win)]  # noqa: E731
        window_attn = 4 * D * t * sum((a * b * m * m) ** 2 for a in sides(H) for b in sides(W))
        blocks = sum(full_attn if i in v.fullatt_block_indexes else window_attn for i in range(v.depth))
        blocks += v.depth * (4 * linear(N, D, D) + 3 * linear(N, D, v.intermediate_size))
        out = v.out_hidden_size
    else:
        blocks = v.depth * (4 * linear(N, D, D) + full_attn + 2 * linear(N, D, D * v.mlp_ratio))
        out = v.hidden_size
    merged, width = N // (m * m), D * m * m
    return conv + blocks + linear(merged, width, width) + linear(merged, width, out)


def vision_flops(config, sizes: list) -> int:
    """Vision tower + projector FLOPs for the images of one prompt (see the module docstring for sizes)."""
    if patch_grids(config):
        return sum(_qwen_vision(config, grid) for grid in sizes)
    per_crop, _ = _tower_on_crop(config)
    return sum(per_crop * crops(config, size, len(sizes)) for size in sizes)


def default_image(config):
    """The image size the presets assume: the tower's own square, or 448x448 for Qwen2-VL / Qwen2.5-VL."""
    if patch_grids(config):
        side = 448 // config.vision_config.patch_size
        return (1, side, side)
    side = config.vision_config.image_size
    return (side, side)


def image_tokens(config, sizes: list) -> int:
    """Language-model tokens the images of one prompt become."""
    if patch_grids(config):
        m = config.vision_config.spatial_merge_size
        return sum(math.prod(grid) // (m * m) for grid in sizes)
    if family(config) == "llava":
        return config.image_seq_length * len(sizes)
    return sum(_anyres_tokens(_geometry(config), tuple(map(tuple, sizes))))


def _geometry(config) -> tuple:
    c, v = config, config.vision_config
    return (family(c), v.model_type, v.image_size, v.patch_size, tuple(map(tuple, c.image_grid_pinpoints)),
            c.vision_feature_select_strategy, getattr(c, "vision_aspect_ratio", None))  # fmt: skip


@functools.lru_cache(maxsize=64)
def _anyres_tokens(geometry: tuple, sizes: tuple) -> list[int]:
    """Per-image token counts from the stock get_image_features of a shape twin (see the docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    model_type, vision_type, image_size, patch, pinpoints, strategy, aspect = geometry
    tiny = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    extra = {"vision_aspect_ratio": aspect} if aspect is not None else {}
    config = AutoConfig.for_model(
        model_type, vision_config=dict(model_type=vision_type, image_size=image_size, patch_size=patch, **tiny),
        text_config=dict(model_type="llama", vocab_size=8, **tiny), image_grid_pinpoints=[list(p) for p in pinpoints],
        vision_feature_select_strategy=strategy, vision_feature_layer=-1, **extra,
    )  # fmt: skip
    model = AutoModelForImageTextToText.from_config(config).eval()
    n_crops = max(crops(config, s, len(sizes)) for s in sizes)
    pixels = torch.zeros(len(sizes), n_crops, 3, image_size, image_size)
    kw = {"batch_num_images": torch.tensor([len(sizes)])} if model_type == "llava_onevision" else {}
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor(sizes), **kw)
    return [f.shape[0] for f in feats.pooler_output]
