"""Tiny random models of every routed vision-language family beyond LLaVA-1.5, and their inputs, built
in code (no downloads): LLaVA-NeXT and LLaVA-OneVision (anyres: image sizes, newline tokens, a token
count per image that depends on its size) and Qwen2-VL / Qwen2.5-VL (flattened patches,
image_grid_thw, multimodal rope). Token counts per image come from the stock get_image_features, as
the processors compute them."""
from __future__ import annotations

import torch
from tiny import PAD, VOCAB
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)

FAMILIES = ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
IMAGE, VIDEO, V_START, V_END = 5, 6, 7, 8
QWEN = ("qwen2_vl", "qwen2_5_vl")
PX = 16  # anyres base tile (px); Qwen: patch 2, merge 2 -> one token per 4x4 px
# image sizes used by the tests: (height, width) px for anyres, the (t, h, w) grid for Qwen
SIZES = {"anyres": [(16, 32), (32, 32), (30, 18)], "qwen": [(1, 4, 4), (1, 4, 8), (1, 6, 4)]}


def _text(layers: int, model_type: str | None) -> dict:
    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=PAD, max_position_embeddings=512,
                bos_token_id=None, eos_token_id=None)  # fmt: skip
    if model_type is not None:
        text["model_type"] = model_type
    return text


def _config(family: str, layers: int):
    grid = dict(image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]], image_token_index=IMAGE)
    if family == "llava_next":
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=PX, patch_size=4)  # fmt: skip
        return LlavaNextConfig(vision_config=vision, text_config=_text(layers, "llama"), vision_feature_layer=-2, **grid)
    if family == "llava_onevision":
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=PX, patch_size=4)  # fmt: skip
        return LlavaOnevisionConfig(vision_config=vision, text_config=_text(layers, "qwen2"), vision_feature_layer=-1,
                                    video_token_index=VIDEO, **grid)  # fmt: skip
    vision = dict(depth=2, embed_dim=32, hidden_size=48, num_heads=2, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2)  # fmt: skip
    text = dict(_text(layers, None), rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2]})
    cls = Qwen2VLConfig
    if family == "qwen2_5_vl":
        vision.update(out_hidden_size=48, intermediate_size=64, fullatt_block_indexes=[1], window_size=8)
        cls = Qwen2_5_VLConfig
    return cls(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
               vision_start_token_id=V_START, vision_end_token_id=V_END)  # fmt: skip


STOCK = {
    "llava_next": LlavaNextForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}


def tiny_vlm(family: str, layers: int = 6, attn: str = "eager", seed: int = 0):
    config = _config(family, layers)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn
    torch.manual_seed(seed)
    model = STOCK[family](config).eval()
    with torch.no_grad():  # random init is small; scale up so routing differences are far above float noise
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def _one_image(family: str, size, g: torch.Generator) -> dict:
    if family in QWEN:
        t, h, w = size
        return {"pixel_values": torch.randn(t * h * w, 3 * 2 * 2 * 2, generator=g), "image_grid_thw": torch.tensor([size])}
    return {"pixel_values": torch.randn(1, 5, 3, PX, PX, generator=g), "image_sizes": torch.tensor([size])}


def _cat(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def _token_counts(model, family: str, vision: dict, per_row: list[int]) -> list[int]:
    extra = {"batch_num_images": torch.tensor(per_row)} if family == "llava_onevision" else {}
    with torch.no_grad():
        feats = model.model.get_image_features(**vision, **extra, return_dict=True).pooler_output
    return [f.shape[0] for f in feats]


def sample(family: str, model, rows: list[tuple[int, list[int], int]], seed: int = 0):
    """rows: (text tokens before, indices into SIZES of the row's images, text tokens after).
    Returns (left-padded batch inputs, one input dict per row run alone)."""
    g = torch.Generator().manual_seed(seed)
    sizes = SIZES["qwen" if family in QWEN else "anyres"]
    text = lambda n: torch.randint(9, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    singles = []
    for pre, images, post in rows:
        vision = _cat([_one_image(family, sizes[i], g) for i in images])
        counts = _token_counts(model, family, vision, [len(images)]) if images else []
        ids = text(pre)
        for n in counts:
            span = [IMAGE] * n
            ids += [V_START, *span, V_END] if family in QWEN else span
            ids += text(1)
        ids = torch.tensor([ids + text(post)])
        single = {"input_ids": ids, **vision}
        if family in QWEN:
            single["mm_token_type_ids"] = (ids == IMAGE).int()
        if family == "llava_onevision" and images:
            single["batch_num_images"] = torch.tensor([len(images)])
        singles.append(single)
    return batch_of(family, singles), singles


def batch_of(family: str, singles: list[dict]) -> dict:
    """Left-pad single-row inputs into one batch (vision inputs concatenated in row order)."""
    T = max(s["input_ids"].shape[1] for s in singles)
    ids = torch.full((len(singles), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(singles), T, dtype=torch.long)
    for b, s in enumerate(singles):
        n = s["input_ids"].shape[1]
        ids[b, T - n:], mask[b, T - n:] = s["input_ids"][0], 1
    batch = {"input_ids": ids, "attention_mask": mask}
    batch.update(_cat([{k: v for k, v in s.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
                       for s in singles if "pixel_values" in s]))  # fmt: skip
    if family in QWEN:
        batch["mm_token_type_ids"] = (ids == IMAGE).int()
    if family == "llava_onevision":
        batch["batch_num_images"] = torch.tensor([len(s.get("image_sizes", ())) for s in singles])
    return batch


def save_next_checkpoint(path, layers: int = 6, seed: int = 0):
    """A tiny random LLaVA-NeXT checkpoint that reads the digit-scenes benchmark: the embedded word-level
    tokenizer and chat template, an anyres processor (48-px scenes become a base view and four 16-px
    tiles), saved like an llava-hf checkpoint (config, weights, processor)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from dpvr.embedded.model import CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer()
    pinpoints = [[16, 32], [32, 16], [32, 32]]
    images = LlavaNextImageProcessorPil(size={"shortest_edge": PX}, crop_size={"height": PX, "width": PX},
                                        image_grid_pinpoints=pinpoints)  # fmt: skip
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4, chat_template=CHAT_TEMPLATE,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    config = _config("llava_next", layers)
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _qwen_template() -> str:
    """The embedded chat template with Qwen2-VL's image placeholder (the image token between its vision marks)."""
    from dpvr.embedded.model import CHAT_TEMPLATE

    template = CHAT_TEMPLATE.replace("{{ '<image>\n' }}", "{{ '<|vision_start|><image><|vision_end|>\n' }}")
    assert template != CHAT_TEMPLATE, "the embedded chat template no longer writes the image as expected"
    return template


def save_qwen_checkpoint(path, family: str = "qwen2_vl", layers: int = 6, seed: int = 0):
    """A tiny random Qwen2-VL / Qwen2.5-VL checkpoint that reads the digit-scenes benchmark: the embedded
    word-level tokenizer with Qwen's vision tokens, a Qwen2-VL processor (48-px scenes are a 12x12 patch
    grid of 4 px, 36 tokens after the 2x2 merge). Its video processor needs torchvision."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from dpvr.embedded.model import build_tokenizer

    tokenizer = build_tokenizer()  # its image token, <image>, is the processor's image placeholder
    specials = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
    tokenizer.add_tokens(specials, special_tokens=True)
    size = {"shortest_edge": 48 * 48, "longest_edge": 48 * 48}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, size=size),
        video_processor=Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, size=size),
        tokenizer=tokenizer, chat_template=_qwen_template(),
    )  # fmt: skip
    config = _config(family, layers)
    config.vision_config.patch_size = 4
    ids = dict(zip(["image_token_id", "vision_start_token_id", "vision_end_token_id", "video_token_id"],
                   tokenizer.convert_tokens_to_ids([tokenizer.image_token, *specials])))  # fmt: skip
    for key, value in ids.items():
        setattr(config, key, value)
    config.text_config.vocab_size, config.text_config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = STOCK[family](config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
