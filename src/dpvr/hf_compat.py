"""The one place where dpvr follows an API that moved inside transformers 5.x (pyproject.toml still pins
5.23.0; the suite also ran at 5.19 and 5.25 with this module, see issue 40's note). Each helper says which
versions differ and why; the rest of dpvr calls the helper, never the moved name."""
from __future__ import annotations

import dataclasses
import inspect

import torch
import transformers
from packaging.version import Version
from transformers import PreTrainedModel

from dpvr.errors import DPVRError

# transformers 5.17 moved Qwen2-VL's and Qwen2.5-VL's multimodal-rope fold (each section of the head dim
# taken from its own position axis) out of the attention and into the rotary embedding
_ATTENTION_FOLDS_MROPE = Version(transformers.__version__) < Version("5.17")
# transformers 5.23 renamed gradient checkpointing to activation checkpointing (`activation_checkpointing_enable`,
# `is_activation_checkpointing`); the old names, 5.16-5.22's only ones, stay as aliases that warn FutureWarning
CHECKPOINTING_RENAMED = hasattr(PreTrainedModel, "activation_checkpointing_enable")


def activation_checkpointing(model) -> bool:
    """Whether the model's layers checkpoint their activations, by this version's name for it."""
    return model.is_activation_checkpointing if CHECKPOINTING_RENAMED else model.is_gradient_checkpointing


def stock_checkpointing_enable(stock, kwargs: dict | None = None, **options) -> None:
    """Turn activation checkpointing on through `stock` (a PreTrainedModel, or super() in a subclass that
    overrides the enabling), by this version's name for it; kwargs go to torch's checkpoint."""
    if CHECKPOINTING_RENAMED:
        stock.activation_checkpointing_enable(kwargs, **options)
    else:
        stock.gradient_checkpointing_enable(kwargs, **options)


def rope_tables(lm: torch.nn.Module, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) (B, T, hd) of the language model's rotary embedding at positions pos (B, T) or (3, B, T):
    what Llama-style rotation and every routed gather take. Before 5.17 a multimodal-rope model's
    rotary embedding returns one table per axis (3, B, T, hd); they are folded here as 5.17+ folds them."""
    cos, sin = lm.rotary_emb(h, pos)
    if cos.dim() == 4:
        section = lm.config.rope_parameters["mrope_section"]
        cos, sin = _fold_axes(cos, section), _fold_axes(sin, section)
    return cos, sin


def _fold_axes(table: torch.Tensor, section: list[int]) -> torch.Tensor:
    # the head dim is [section, section] (cos/sin repeat for the rotated halves); chunk i from axis i % 3
    return torch.cat([m[i % 3] for i, m in enumerate(table.split(section * 2, dim=-1))], dim=-1)


def layer_rope(layer: torch.nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded (cos, sin) as this stock decoder layer's `position_embeddings` takes them. Before 5.17 a
    multimodal-rope attention folds per-axis tables itself: it gets three copies of the folded table,
    which its fold maps back to the same table."""
    rope = getattr(layer.self_attn.config, "rope_parameters", None) or {}
    if _ATTENTION_FOLDS_MROPE and "mrope_section" in rope:
        return cos.expand(3, *cos.shape), sin.expand(3, *sin.shape)
    return cos, sin


def llava_output(loss, logits, cache, hidden_states, image_features):
    """The stock LLaVA output object (every family's routed forward returns it). transformers 5.24 renamed
    its `past_key_values` field to `cache` and replaced `image_hidden_states` by `image_outputs`, the image
    encoder's output, whose pooler_output the `image_hidden_states` property now reads."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast as Output

    if "image_outputs" not in Output.__dataclass_fields__:
        return Output(loss=loss, logits=logits, past_key_values=cache, hidden_states=hidden_states,
                      image_hidden_states=image_features)  # fmt: skip
    images = None if image_features is None else BaseModelOutputWithPooling(pooler_output=image_features)
    return Output(loss=loss, logits=logits, cache=cache, hidden_states=hidden_states, image_outputs=images)


def _layer_cache_kwarg() -> str:
    # transformers 5.24 renamed the decoder layers' `past_key_values` argument to `cache` in every verified
    # family at once; the old name still works there, through a FutureWarning on every call
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


LAYER_CACHE_KWARG = _layer_cache_kwarg()  # the name a decoder layer takes its cache by


def _takes_cache(fn) -> bool:
    # transformers 5.24 renamed `past_key_values` to `cache` at once in the families' forwards, in generate()
    # (and the model_kwargs it keeps the cache under) and in the output classes; the old argument name still
    # works there, through a FutureWarning on every call (inspect follows the deprecation wrapper's __wrapped__)
    return "cache" in inspect.signature(fn).parameters


def _stock_cache_kwarg() -> str:
    from transformers import LlavaForConditionalGeneration

    return "cache" if _takes_cache(LlavaForConditionalGeneration.forward) else "past_key_values"


def _generate_cache_key() -> str:
    from transformers.generation.utils import GenerationMixin

    # generate() passes its model_kwargs to prepare_inputs_for_generation: the key is that parameter's name
    return "cache" if _takes_cache(GenerationMixin.prepare_inputs_for_generation) else "past_key_values"


STOCK_CACHE_KWARG = _stock_cache_kwarg()  # the name a stock forward (a family's, its language model's) takes its cache by
GENERATE_CACHE_KEY = _generate_cache_key()  # where generate() keeps its cache in model_kwargs


def forward_cache(past_key_values, kwargs: dict):
    """The cache a forward call was given, by either name: `past_key_values` (dpvr's own, and the stock one
    before 5.24) or `cache` (the stock name from 5.24, what generate() passes); `cache` is popped from kwargs."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise DPVRError("pass the cache once: as past_key_values or as cache, not both")
    return past_key_values if cache is None else cache


def output_cache(out):
    """The cache a forward returned on its output object (`cache` from 5.24, `past_key_values` before;
    the old name is a property there that logs a deprecation)."""
    names = {f.name for f in dataclasses.fields(out)}
    return out.cache if "cache" in names else out.past_key_values


def train_loss_steps(trainer) -> int:
    """The step count the Trainer divides its summed loss by for train()'s train_loss: from 5.19 the steps
    of this train() call (it records the step it resumed at as `_initial_global_step`), before 5.19 every
    step of the run, so the resumed ones too (a resumed run's train_loss there is too small)."""
    return trainer.state.global_step - getattr(trainer, "_initial_global_step", 0)
