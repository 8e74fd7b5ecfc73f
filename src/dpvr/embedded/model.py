"""The tiny LLaVA: a stock `LlavaForConditionalGeneration` (CLIP tower + Llama) with a word-level
tokenizer, processor and chat template, saved together so it loads exactly as llava-hf checkpoints do.

    from dpvr.embedded import build_tiny_model, default_model_path
    model, processor = build_tiny_model(seed=0)          # untrained
    LlavaForConditionalGeneration.from_pretrained(default_model_path()); AutoProcessor.from_pretrained(...)

Shape (chosen to look like LLaVA-1.5 where routing cares): 48x48 images, patch 4 -> 144 image tokens
(CLS dropped, "default" strategy) against ~11-22 text tokens per prompt (LLaVA-1.5: 576 against
~40-60); Llama with 16 layers, hidden 192, 6 MHA heads, untied embeddings; ~7.8M parameters.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from dpvr.data.digit_scenes import CELL, IMAGE_SIZE, WORDS_PER_CELL_SIDE
from dpvr.data.scene_questions import vocabulary

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIALS = [PAD, UNK, BOS, EOS, IMAGE]  # ids 0..4
PATCH = CELL // WORDS_PER_CELL_SIDE  # 4: a cell's patches sit where a worded scene puts its words
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 144: CLS dropped
TEXT_LAYERS = 16
# llava-hf's template, except that an assistant answer ends with </s> (the tiny model is trained on
# this template, so generation stops there); renders `USER: <image>\n{question} ASSISTANT:`
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + '</s>' }}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: one id per benchmark word (split on whitespace), specials first, <s> prepended."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE}, model_max_length=512,
    )  # fmt: skip
    fast.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return fast


def build_processor() -> LlavaProcessor:
    # the PIL CLIP processor: no torchvision needed (the default "fast" one requires it)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def tiny_config(vocab_size: int, text_layers: int = TEXT_LAYERS) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=128,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=192, intermediate_size=512, num_hidden_layers=text_layers, num_attention_heads=6,
        num_key_value_heads=6, vocab_size=vocab_size, max_position_embeddings=512,
        pad_token_id=SPECIALS.index(PAD), bos_token_id=SPECIALS.index(BOS), eos_token_id=SPECIALS.index(EOS),
        tie_word_embeddings=False,
    )  # fmt: skip
    # vision_feature_layer -1, not LLaVA-1.5's -2: in a 3-layer tower the last layer would be dead weight
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=SPECIALS.index(IMAGE),
        image_seq_length=N_IMAGE_TOKENS, vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )  # fmt: skip


def build_tiny_model(seed: int = 0, text_layers: int = TEXT_LAYERS) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The untrained tiny LLaVA (random init from `seed`) and its processor. Training starts with a
    shallower language model (`text_layers`) and grows it (`dpvr.embedded.train_tiny`)."""
    processor = build_processor()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_config(len(processor.tokenizer), text_layers))
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    gen.max_new_tokens = 16
    return model, processor


PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID = range(len(SPECIALS))


def save_checkpoint(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: str | os.PathLike,
                    extra: Callable[[Path], None] | None = None) -> Path:  # fmt: skip
    """Write model (fp32 safetensors) + processor (+ whatever `extra(tmp_dir)` adds) into out atomically:
    a temp sibling dir, then rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    if extra is not None:
        extra(tmp)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out
