"""Architecture presets for FLOP tables and latency benchmarks (random weights, nothing downloaded).

    tiny            the embedded tiny LLaVA's config (dpvr.embedded.default_model_path())
    llava-1.5-7b    CLIP ViT-L/14-336 (576 image tokens) + Vicuna-7B shape: 32 layers, hidden 4096
    llava-1.5-13b   the same vision tower + Vicuna-13B shape: 40 layers, hidden 5120
    qwen2.5-vl-7b   Qwen2.5-VL-7B-Instruct: windowed ViT (32 blocks, width 1280) + Qwen2-7B shape (28 layers,
                    hidden 3584, 4 KV heads); a 448x448 image is a (1, 32, 32) patch grid = 256 image tokens
    llava-onevision-7b  llava-onevision-qwen2-7b-ov-hf: SigLIP-so400m (26 layers, 384 px) with anyres_max_9
                    tiling + Qwen2-7B shape; a 384x384 image is 2 crops = 1485 image tokens (newlines included)
    PATH            any routed family's checkpoint folder's config (llava, llava_next, llava_onevision,
                    qwen2_vl, qwen2_5_vl)
    cpu-7b-narrow   the 7B's depth (32 layers), split (18) and 576 image tokens, at hidden 512 with a
                    small vision tower: routing ratios measurable on a laptop CPU
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dpvr.errors import DPVRError

# transformers and torch are imported where a preset is built, so that flags naming PRESETS parse at once

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
SMALL_CLIP_336 = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      image_size=336, patch_size=14, projection_dim=128)  # fmt: skip


def _llama(hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    return dict(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads, intermediate_size=intermediate, vocab_size=32064,
                max_position_embeddings=4096, pad_token_id=32001)  # fmt: skip


def _llava(vision: dict, text: dict):
    from transformers import CLIPVisionConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=text, image_token_index=32000, image_seq_length=576,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip


# Qwen2-7B's decoder, the language model of both 7B presets below
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, max_position_embeddings=32768)  # fmt: skip


def _qwen25_vl_7b():
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584)  # fmt: skip
    text = dict(QWEN2_7B, vocab_size=152064, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                              "rope_theta": 1e6})  # fmt: skip
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text)


def _llava_onevision_7b():
    from transformers import LlavaOnevisionConfig

    # the class defaults are the 7B checkpoint's vision tower, anyres_max_9 and its 6x6 grid of 384-px tiles
    return LlavaOnevisionConfig(text_config=dict(model_type="qwen2", vocab_size=152128, **QWEN2_7B))


def _tiny():
    from transformers import LlavaConfig

    from dpvr.embedded import default_model_path

    return LlavaConfig.from_pretrained(default_model_path())


PRESETS = {
    "tiny": _tiny,
    "llava-1.5-7b": lambda: _llava(CLIP_L_336, _llama(4096, 32, 32, 11008)),
    "llava-1.5-13b": lambda: _llava(CLIP_L_336, _llama(5120, 40, 40, 13824)),
    "cpu-7b-narrow": lambda: _llava(SMALL_CLIP_336, _llama(512, 32, 8, 1376)),
    "qwen2.5-vl-7b": _qwen25_vl_7b,
    "llava-onevision-7b": _llava_onevision_7b,
}


def preset_config(name: str):
    """A preset by name, or the config of a routed family's checkpoint folder (its shape, not its weights)."""
    if name in PRESETS:
        return PRESETS[name]()
    if Path(name, "config.json").exists():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name)
    raise DPVRError(f"unknown architecture preset {name!r}; choose from {sorted(PRESETS)} or a checkpoint folder")


def preset_arg(text: str) -> str:
    """argparse type of an architecture option: a preset name or a checkpoint folder, else a usage error."""
    if text in PRESETS or Path(text, "config.json").exists():
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(sorted(PRESETS))} or a "
                                     "checkpoint folder)")  # fmt: skip


def build_random_model(name: str, dtype=None, device="cpu", attn: str = "sdpa"):
    """A randomly initialised stock model of the preset's shape and family, in eval mode (dtype: float32 if None)."""
    import torch

    from dpvr.routing.backbones import backbone_of

    dtype = torch.float32 if dtype is None else dtype
    config = preset_config(name)
    config._attn_implementation = attn
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = attn
    with torch.device(device):
        model = backbone_of(config).stock._from_config(config, dtype=dtype)
    return model.eval()
