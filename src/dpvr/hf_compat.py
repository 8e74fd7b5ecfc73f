"""The one place where dpvr follows an API that moved inside transformers 5.x, within the range
pyproject.toml allows (CI runs the suite at both ends). Each helper says which
versions differ and why; the rest of dpvr calls the helper, never the moved name."""
from __future__ import annotations

import dataclasses
import inspect

from transformers import PreTrainedModel

from dpvr.errors import DPVRError

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
