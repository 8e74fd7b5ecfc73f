"""Every input of a routed model's forward() and generate() (GenerationConfig's fields included),
classified: "exact" (the same result as full recompute, or as the stock model on a text-only prompt;
each is tested), "refused" (a one-line DPVRError naming it) or "ignored (why)". The forward refuses
any keyword it does not find here, and tests/test_inputs.py fails on a forward parameter or generation
field missing from these tables, so an input that a new transformers version adds cannot silently be
dropped by routing. Both apply in routed modes only; mode='vanilla' is the stock model itself."""
from __future__ import annotations

import torch

from dpvr.errors import DPVRError

EXACT, REFUSED = "exact", "refused"

FORWARD_INPUTS: dict[str, str] = {
    "input_ids": EXACT,  # needed: routing finds the image positions in it
    "pixel_values": EXACT,  # refused with no image token, or while decoding from a filled cache
    "attention_mask": EXACT,  # left padding and holes; refused when it masks an image token
    "position_ids": EXACT,
    "past_key_values": EXACT,  # a RoutedCache; refused: a cache of any other type, empty or filled
    "cache": EXACT,  # past_key_values by the stock name from transformers 5.24 (what generate() passes there)
    "cache_position": EXACT,  # refused unless it is the positions the cache's length implies
    "use_cache": EXACT,
    "labels": EXACT,
    "num_items_in_batch": EXACT,  # the Trainer's loss normaliser
    "logits_to_keep": EXACT,  # an int or an index tensor
    "return_dict": EXACT,  # False gives the stock tuple
    "output_hidden_states": EXACT,
    "output_attentions": EXACT,  # text-only prompts; refused for image prompts (no whole-sequence map exists)
    "image_sizes": EXACT,
    "vision_feature_layer": EXACT,
    "vision_feature_select_strategy": EXACT,
    "vision_aspect_ratio": EXACT,
    "batch_num_images": EXACT,
    "image_grid_thw": EXACT,
    "mm_token_type_ids": EXACT,
    "mm_encoder_outputs": EXACT,  # the image features generate() encodes once, up front
    "shared_states": EXACT,  # dpvr's own: the shared stack's cached output (dpvr.train.shared_cache)
    "image_sizes_videos": "ignored (read with pixel_values_videos only, which is refused)",
    "second_per_grid_ts": "ignored (video timing: read with video_grid_thw only, which is refused)",
    "kwargs": "ignored (a name only: its keywords are this table's; any other is refused)",
    # generate(tokenizer=...) (for stop_strings; transformers serve always passes it) reaches the forward
    # among the model kwargs, as it does the stock forward, which ignores it
    "tokenizer": "ignored (generate() passes it on; it is read by stop_strings only)",
}
_VIDEO = "video input is not routed yet; route image prompts"
_PACKED = "packed sequences (flash-attention kwargs) are not routed; pass padded batches with an attention_mask"
# refused forward inputs -> why; the stock TransformersKwargs that routing does not serve are listed too
FORWARD_REFUSALS: dict[str, str] = {
    "inputs_embeds": "routing finds the image positions in input_ids; pass input_ids instead",
    "pixel_values_videos": _VIDEO,
    "video_grid_thw": _VIDEO,
    "cu_seq_lens_q": _PACKED,
    "cu_seq_lens_k": _PACKED,
    "max_length_q": _PACKED,
    "max_length_k": _PACKED,
    "seq_idx": _PACKED,
    "is_causal": "routed attention is causal; a non-causal mask is not routed",
    "output_router_logits": "no routed family has a mixture-of-experts text model",
}
FORWARD_INPUTS.update(dict.fromkeys(FORWARD_REFUSALS, REFUSED))

# GenerationConfig fields and generate()'s own parameters. Logits processors, stopping criteria and output
# flags act on the logits the forward returns, so they are exact whenever the forward is.
_ON_LOGITS = (
    "max_length max_new_tokens min_length min_new_tokens early_stopping max_time stop_strings do_sample "
    "temperature top_k top_p min_p top_h typical_p epsilon_cutoff eta_cutoff repetition_penalty "
    "encoder_repetition_penalty length_penalty no_repeat_ngram_size bad_words_ids renormalize_logits "
    "forced_bos_token_id forced_eos_token_id remove_invalid_values exponential_decay_length_penalty "
    "suppress_tokens begin_suppress_tokens sequence_bias watermarking_config num_return_sequences output_scores "
    "output_logits return_dict_in_generate pad_token_id bos_token_id eos_token_id decoder_start_token_id num_beams "
    "inputs generation_config logits_processor stopping_criteria prefix_allowed_tokens_fn synced_gpus streamer "
    "use_model_defaults kwargs"
).split()
_ASSISTANT_ONLY = ("is_assistant num_assistant_tokens num_assistant_tokens_schedule assistant_confidence_threshold "
                   "max_matching_ngram_size assistant_lookbehind target_lookbehind assistant_ensemble_weight").split()  # fmt: skip
_NO_ROLLBACK = "the RoutedCache cannot roll back rejected draft tokens"
_CUSTOM = "a decoding strategy transformers moved to custom_generate code that dpvr has not verified"
# name -> why it is refused (a value other than the harmless one in _HARMLESS)
REFUSED_GENERATE: dict[str, str] = {
    "cache_implementation": "routed modes generate with their own RoutedCache (each layer holds the tokens it "
                            "attended over); leave it unset",  # fmt: skip
    "prefill_chunk_size": "a chunked prompt reaches the routed forward as a prefill that ends mid-prompt, maybe "
                          "inside an image; prefill the whole prompt",  # fmt: skip
    "assistant_model": _NO_ROLLBACK,
    "prompt_lookup_num_tokens": _NO_ROLLBACK,
    "assistant_early_exit": _NO_ROLLBACK,
    "use_mtp": _NO_ROLLBACK,
    "speculation_type": _NO_ROLLBACK,
    "guidance_scale": "classifier-free guidance runs the model on a second, unconditional prompt with a cache of its "
                      "own, which dpvr has not verified",  # fmt: skip
    "negative_prompt_ids": "it is guidance_scale's unconditional prompt",
    "negative_prompt_attention_mask": "it is guidance_scale's unconditional prompt",
    "token_healing": "it rewrites the prompt's tail, which dpvr has not verified around image tokens",
    "custom_generate": "a decoding loop dpvr has not verified against the routed cache",
    "penalty_alpha": _CUSTOM,
    "dola_layers": _CUSTOM,
    "num_beam_groups": _CUSTOM,
    "diversity_penalty": _CUSTOM,
    "constraints": _CUSTOM,
    "force_words_ids": _CUSTOM,
    "low_memory": "transformers itself refuses it",
}
_HARMLESS = {"cache_implementation": "dynamic", "num_beam_groups": 1, "diversity_penalty": 0.0, "guidance_scale": 1.0}

GENERATE_INPUTS: dict[str, str] = {
    **dict.fromkeys(_ON_LOGITS, EXACT),
    "use_cache": EXACT,  # False recomputes the whole context per token
    "output_hidden_states": EXACT,
    "output_attentions": EXACT,  # as the forward: text-only prompts; refused for image prompts
    **dict.fromkeys(REFUSED_GENERATE, REFUSED),
    **dict.fromkeys(_ASSISTANT_ONLY, "ignored (read with an assistant model only, which is refused)"),
    "cache_config": "ignored (read with cache_implementation only, which is refused)",
    "max_cache_len": "ignored (read with cache_implementation only, which is refused)",
    "compile_config": "ignored (generate() auto-compiles compileable caches only; a RoutedCache is not one)",
    "disable_compile": "ignored (generate() auto-compiles compileable caches only; a RoutedCache is not one)",
    "continuous_batching_config": "ignored (by generate(); generate_batch()'s packed-sequence kwargs are refused "
                                  "by the forward)",  # fmt: skip
    "encoder_no_repeat_ngram_size": "ignored (encoder-decoder models only)",
    "_from_model_config": "ignored (bookkeeping)",
    "transformers_version": "ignored (bookkeeping)",
}


def check_forward_kwargs(kwargs: dict, inputs_embeds) -> None:
    """Refuse the forward inputs FORWARD_REFUSALS names, and any keyword missing from FORWARD_INPUTS (the
    stock forward would pass it on to its attention; routing would silently drop it)."""
    given = {k: v for k, v in kwargs.items() if v is not None and v is not False}
    if inputs_embeds is not None:
        given["inputs_embeds"] = inputs_embeds
    for name in sorted(given):
        if name in FORWARD_REFUSALS:
            raise DPVRError(f"{name}: {FORWARD_REFUSALS[name]} (or run inside model.routing(mode='vanilla'))")
        if name not in FORWARD_INPUTS:
            raise DPVRError(f"{name}: not an input the routed forward serves (see dpvr.routing.inputs."
                            "FORWARD_INPUTS); drop it, or run inside model.routing(mode='vanilla')")  # fmt: skip


def check_cache_position(cache_position, seen: int, n: int) -> None:
    """Routing derives positions from the cache's length; a cache_position saying otherwise is refused."""
    if cache_position is None:
        return
    want = torch.arange(seen, seen + n, device=cache_position.device)
    if cache_position.shape != want.shape or not torch.equal(cache_position, want):
        raise DPVRError(f"cache_position: the routed cache has seen {seen} positions, so {n} new tokens are at "
                        f"[{seen}, {seen + n}); got {cache_position.tolist()}")  # fmt: skip


def check_generate(defaults, kwargs: dict) -> None:
    """Refuse generate() settings (keywords, or the generation config's fields) in REFUSED_GENERATE."""
    config = kwargs.get("generation_config") or defaults
    for name, why in REFUSED_GENERATE.items():
        value = kwargs[name] if name in kwargs else getattr(config, name, None)
        if value is None or value is False or (name in _HARMLESS and value == _HARMLESS[name]):
            continue
        shown = type(value).__name__ if isinstance(value, torch.nn.Module | torch.Tensor) else repr(value)
        raise DPVRError(f"{name}={shown} is not supported in routed modes: {why}; drop it, or generate inside "
                        "model.routing(mode='vanilla')")  # fmt: skip
