"""Tiny random LLaVA models and inputs built in code (no downloads), shared by the routing tests."""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 5
PAD = 0
VOCAB = 64
N_IMG = 16  # tokens per image: 16x16 image, patch 4, CLS dropped ("default" strategy)


def tiny_config(backbone: str = "llama", layers: int = 6, attn: str = "eager", kv_heads: int = 2) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=16, patch_size=4, projection_dim=32,
    )  # fmt: skip
    text = dict(
        model_type=backbone, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=VOCAB, pad_token_id=PAD,
        max_position_embeddings=256,
    )  # fmt: skip
    if backbone in ("mistral", "qwen2", "qwen3"):
        text["sliding_window"] = None
    if backbone == "qwen3":
        text["head_dim"] = 12
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=N_IMG,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    return config


def tiny_llava(backbone: str = "llama", layers: int = 6, attn: str = "eager", seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_config(backbone, layers, attn, **kw)).eval()
    # random init is small; scale up so routing differences are far above float noise
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def prompt(pre: int, post: int, n_images: int = 1, seed: int = 0) -> list[int]:
    """Text tokens, then image spans separated by a text token, then text (ids avoid pad/image)."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: (torch.randint(6, VOCAB, (n,), generator=g)).tolist()  # noqa: E731
    ids = text(pre)
    for i in range(n_images):
        ids += [IMAGE_TOKEN] * N_IMG + (text(1) if i < n_images - 1 else [])
    return ids + text(post)


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return ids, mask
