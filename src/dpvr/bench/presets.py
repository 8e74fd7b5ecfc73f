"""Architecture presets for FLOP tables and latency benchmarks (random weights, nothing downloaded).

    tiny            the embedded tiny LLaVA's config (dpvr.embedded.default_model_path())
    llava-1.5-7b    CLIP ViT-L/14-336 (576 image tokens) + Vicuna-7B shape: 32 layers, hidden 4096
    llava-1.5-13b   the same vision tower + Vicuna-13B shape: 40 layers, hidden 5120
    PATH            any llava checkpoint folder's config
    cpu-7b-narrow   the 7B's depth (32 layers), split (18) and 576 image tokens, at hidden 512 with a
                    small vision tower: routing ratios measurable on a laptop CPU
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
SMALL_CLIP_336 = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      image_size=336, patch_size=14, projection_dim=128)  # fmt: skip


def _llama(hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    return dict(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads, intermediate_size=intermediate, vocab_size=32064,
                max_position_embeddings=4096, pad_token_id=32001)  # fmt: skip


def _llava(vision: dict, text: dict) -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=text, image_token_index=32000, image_seq_length=576,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip


def _tiny() -> LlavaConfig:
    from dpvr.embedded import default_model_path

    return LlavaConfig.from_pretrained(default_model_path())


PRESETS = {
    "tiny": _tiny,
    "llava-1.5-7b": lambda: _llava(CLIP_L_336, _llama(4096, 32, 32, 11008)),
    "llava-1.5-13b": lambda: _llava(CLIP_L_336, _llama(5120, 40, 40, 13824)),
    "cpu-7b-narrow": lambda: _llava(SMALL_CLIP_336, _llama(512, 32, 8, 1376)),
}


def preset_config(name: str) -> LlavaConfig:
    """A preset by name, or the config of a llava checkpoint folder (its shape, not its weights)."""
    if name in PRESETS:
        return PRESETS[name]()
    if Path(name, "config.json").exists():
        return LlavaConfig.from_pretrained(name)
    raise ValueError(f"unknown architecture preset {name!r}; choose from {sorted(PRESETS)} or a checkpoint folder")


def build_random_model(name: str, dtype: torch.dtype = torch.float32, device="cpu", attn: str = "sdpa"):
    """A randomly initialised LlavaForConditionalGeneration of the preset's shape, in eval mode."""
    config = preset_config(name)
    config._attn_implementation = attn
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = attn
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()
