"""RoutedModel: the routed forward, caching and training helpers that every DPVR class shares.

A DPVR class is a stock vision-language class with this mixin in front (see `dpvr.routing.classes`:
`DPVRForConditionalGeneration` and one subclass per family in `dpvr.routing.backbones.BACKBONES`), so
the vision tower, projector, `generate`, the Trainer and device maps work unchanged; only `forward`
differs (mode 'vanilla' is the stock forward itself). What differs between families (the image
features, the position ids) comes from the class's `backbone`; the routed decoder loop lives in
`dpvr.routing.forward`, adapter files in `dpvr.routing.adapter`.
"""
from __future__ import annotations

import contextlib

import torch
from transformers.utils import logging

from dpvr.config import DPVRConfig
from dpvr.errors import DPVRError, UnsupportedInput
from dpvr.hf_compat import (
    CHECKPOINTING_RENAMED,
    GENERATE_CACHE_KEY,
    STOCK_CACHE_KWARG,
    activation_checkpointing,
    forward_cache,
    llava_output,
    stock_checkpointing_enable,
)
from dpvr.routing import backbones as bb
from dpvr.routing import guards
from dpvr.routing import inputs as routed_inputs
from dpvr.routing.adapter import save_adapter
from dpvr.routing.cache import RoutedCache
from dpvr.routing.forward import routed_decode, routed_decoder, shared_stack
from dpvr.routing.side import SideBranch, active_side_branch

logger = logging.get_logger(__name__)


class RoutedModel:
    """Mixin for `class DPVR<Family>(RoutedModel, <stock family class>)`; `backbone` is the family's entry."""

    backbone: bb.Backbone

    def __init__(self, config):
        super().__init__(config)
        cfg = self.dpvr_config
        self.side_branch = None
        if cfg.has_side_branch:
            layer_cls = type(self.model.language_model.layers[0])
            s, D = cfg.split_layer, cfg.side_depth
            self.side_branch = SideBranch(layer_cls(config.text_config, s + j) for j in range(D))
            self.side_branch.apply(self._init_weights)

    @property
    def dpvr_config(self) -> DPVRConfig:
        # kept typed on the config (dpvr.routing.classes.TypedRouting): read, not rebuilt, per forward
        return self.config.dpvr if self.config.dpvr is not None else DPVRConfig()

    @property
    def num_text_layers(self) -> int:
        return len(self.model.language_model.layers)

    @contextlib.contextmanager
    def routing(self, **overrides):
        """Temporarily run with other routing fields on the same weights, e.g.
        `with model.routing(mode="vanilla"): ...` or `model.routing(mode="fastv", fastv_ratio=0.75)`."""
        saved = self.config.dpvr
        cfg = self.dpvr_config.with_routing(**overrides).resolve_for(self.config)  # split_layer=None: the model's own
        if cfg.has_side_branch and self.side_branch is None:
            raise DPVRError(f"mode {cfg.mode!r} needs a side branch; this model was converted without one")
        depth = len(active_side_branch(self.side_branch)) if cfg.has_side_branch else cfg.side_depth
        if depth != cfg.side_depth:
            raise DPVRError(f"side_depth={cfg.side_depth} but the side branch has {depth} layers")
        guards.check_side_branch_fits(active_side_branch(self.side_branch), cfg)
        guards.check_attention(self.config.text_config, cfg)
        self.config.dpvr = cfg
        try:
            yield self
        finally:
            self.config.dpvr = saved

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        logits_to_keep=0,
        use_cache=None,
        output_hidden_states=None,
        output_attentions=None,
        **kwargs,
    ):
        """The stock forward's arguments; family inputs (image_sizes, image_grid_thw, ...) come in kwargs."""
        cfg = self.dpvr_config
        past_key_values = forward_cache(past_key_values, kwargs)
        if cfg.mode == "vanilla":
            return super().forward(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                position_ids=position_ids, **{STOCK_CACHE_KWARG: past_key_values}, inputs_embeds=inputs_embeds,
                labels=labels, logits_to_keep=logits_to_keep, use_cache=use_cache,
                output_hidden_states=output_hidden_states, output_attentions=output_attentions, **kwargs,
            )  # fmt: skip
        routed_inputs.check_forward_kwargs(kwargs, inputs_embeds)
        if input_ids is None:
            raise DPVRError("input_ids: routing needs them (to find the image positions)")
        guards.check_attention(self.config.text_config, cfg)
        if output_attentions:
            return self._stock_attentions(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                          position_ids=position_ids, past_key_values=past_key_values, labels=labels,
                                          logits_to_keep=logits_to_keep, use_cache=use_cache,
                                          output_hidden_states=output_hidden_states, **kwargs)  # fmt: skip
        cache_position, return_dict = kwargs.pop("cache_position", None), kwargs.pop("return_dict", None)
        shared = kwargs.pop("shared_states", None)
        cache = None if shared is not None else self._routed_cache(past_key_values, use_cache, input_ids.shape[0])
        routed_inputs.check_cache_position(cache_position, cache.seen if cache is not None else 0, input_ids.shape[1])
        if shared is None and (cache is None or cache.seen == 0) and isinstance(logits_to_keep, int) and logits_to_keep == 1:
            guards.refuse_image_at_end(input_ids, attention_mask, self.config.image_token_id)  # generate()'s prefill
        all_hidden, image_features = ([] if output_hidden_states else None), None
        if shared is not None:
            if pixel_values is not None or past_key_values is not None or output_hidden_states:
                raise DPVRError("shared_states replace the images and the shared stack: pass no pixel_values, "
                                "past_key_values or output_hidden_states with them")  # fmt: skip
            hidden = self._from_shared_stack(shared, input_ids, attention_mask, position_ids, kwargs)
        elif cache is not None and cache.seen > 0:
            hidden = self._decode_step(cache, input_ids, pixel_values, attention_mask, position_ids, all_hidden)
        else:
            hidden, all_hidden, image_features = self._routed_prefill(
                cache, input_ids, pixel_values, attention_mask, position_ids, bool(output_hidden_states), kwargs
            )
        out = self._output(hidden, logits_to_keep, labels, kwargs.get("num_items_in_batch"), cache=cache,
                           hidden_states=all_hidden, image_features=image_features)  # fmt: skip
        return out if return_dict is None or return_dict else out.to_tuple()  # the stock forward's tuple for False

    def _output(self, hidden, logits_to_keep, labels, num_items_in_batch, cache, hidden_states, image_features):
        """The logits (of the positions logits_to_keep names), the loss, and the output object."""
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # num_items_in_batch (Trainer: supervised tokens of the whole step, all micro-batches and ranks), as stock
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      num_items_in_batch=num_items_in_batch)  # fmt: skip
        return llava_output(loss, logits, cache, tuple(hidden_states) if hidden_states is not None else None, image_features)

    def _stock_attentions(self, input_ids, pixel_values, past_key_values, **inputs):
        """output_attentions=True: a text-only prompt runs every layer on every token in every mode, so the
        stock forward is its forward, attentions included; an image prompt's layers see different token
        sets (no attention map of the whole sequence exists), and so does a routed cache's past."""
        text_only = pixel_values is None and "shared_states" not in inputs and not bool(
            (input_ids == self.config.image_token_id).any())  # fmt: skip
        if not text_only or (isinstance(past_key_values, RoutedCache) and past_key_values.seen > 0):
            raise UnsupportedInput(
                "output_attentions is not available under routing for image prompts (layers see different "
                "token sets); use `dpvr analyze` for attention statistics, or mode='vanilla'"
            )
        with self.routing(mode="vanilla"):  # an empty RoutedCache is none: the stock forward makes its own
            return self.forward(input_ids=input_ids, output_attentions=True, **inputs,
                                past_key_values=None if isinstance(past_key_values, RoutedCache) else past_key_values)  # fmt: skip

    def _routed_prefill(self, cache, input_ids, pixel_values, attention_mask, position_ids, keep_hidden, inputs):
        """A prompt through the routed decoder -> (final-norm hidden (B, T, D), hidden states or None,
        image features or None); fills `cache` when given."""
        embeds, is_img, image_features = self._merge_image_features(input_ids, pixel_values, inputs)
        valid = _valid_mask(attention_mask, input_ids, is_img)
        pos, rope_deltas = bb.prefill_positions(self, self.backbone, input_ids, valid, position_ids, inputs)
        out = routed_decoder(
            self.model.language_model,
            active_side_branch(self.side_branch),
            self.dpvr_config,
            embeds,
            is_img,
            valid,
            pos,
            checkpointing=activation_checkpointing(self) and self.training,
            keep_hidden=keep_hidden,
            keep_kv=cache is not None,
        )
        if cache is not None:
            cache.fill(out.layer_kv, seq_len=input_ids.shape[1], dense=bool(valid.all()), rope_deltas=rope_deltas)
        return out.hidden, out.all_hidden, image_features

    @torch.no_grad()
    def shared_stack_states(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None,
                            shared_states=None, from_layer: int = 0, text_path: bool = True, **inputs):  # fmt: skip
        """(states (B, T, D) after the frozen part of the routed forward, positions (B, T) or (3, B, T)):
        the shared stack [0, split) and the text path up to the first step that reads the side branch
        (`dpvr.routing.schedule.split_schedule`). `forward(input_ids, attention_mask=...,
        position_ids=positions, shared_states=states, labels=...)` then runs the rest only
        (dpvr.train.shared_cache caches them per sample). text_path=False: the states after the split,
        every position (what a deeper split goes on from). shared_states with from_layer: the states
        after layers [0, from_layer) of the shared stack (a shallower split's, with its positions as
        position_ids) instead of the images; only the layers from there run."""
        if shared_states is None:
            embeds, is_img, _ = self._merge_image_features(input_ids, pixel_values, inputs)
        else:
            if not 0 < from_layer <= self.dpvr_config.split_layer or pixel_values is not None or position_ids is None:
                raise DPVRError(f"shared_states continue a shallower split: pass position_ids, no pixel_values, and "
                                f"0 < from_layer <= split_layer ({self.dpvr_config.split_layer}), not {from_layer}")  # fmt: skip
            embeds, is_img = shared_states.to(self.dtype), input_ids == self.config.image_token_id
        valid = _valid_mask(attention_mask, input_ids, is_img)
        pos, _ = bb.prefill_positions(self, self.backbone, input_ids, valid, position_ids, inputs)
        lm = self.model.language_model
        return shared_stack(lm, self.dpvr_config, embeds, is_img, valid, pos, start=from_layer, text_path=text_path), pos

    def _from_shared_stack(self, shared, input_ids, attention_mask, position_ids, inputs) -> torch.Tensor:
        """The routed forward from the shared stack's output on -> final-norm hidden (B, T, D)."""
        is_img = input_ids == self.config.image_token_id
        valid = _valid_mask(attention_mask, input_ids, is_img)
        if shared.shape[:2] != input_ids.shape:
            raise DPVRError(f"shared_states has shape {tuple(shared.shape)}: expected {tuple(input_ids.shape)} + (hidden,)")
        pos, _ = bb.prefill_positions(self, self.backbone, input_ids, valid, position_ids, inputs)
        out = routed_decoder(self.model.language_model, active_side_branch(self.side_branch), self.dpvr_config,
                             shared.to(self.dtype), is_img, valid, pos,
                             checkpointing=activation_checkpointing(self) and self.training, shared=True)  # fmt: skip
        return out.hidden

    def _routed_cache(self, past_key_values, use_cache, batch: int) -> RoutedCache | None:
        """The RoutedCache to read/fill, a new one when asked for, or None (no caching)."""
        cfg = self.dpvr_config
        if isinstance(past_key_values, RoutedCache):
            past_key_values.check_compatible(cfg, batch)
            return past_key_values
        if past_key_values is not None:  # filled, its layers hold the stock token sets; empty, the caller would
            # read it back unfilled (routing returns a RoutedCache) and decode as if from a new prompt
            raise DPVRError(
                f"past_key_values: mode {cfg.mode!r} cannot continue from a {type(past_key_values).__name__}, nor fill "
                "one; use the RoutedCache that generate() or use_cache=True creates, or use_cache=False"
            )
        if not use_cache:
            return None
        if self.training and activation_checkpointing(self):
            logger.warning_once("use_cache=True is incompatible with activation checkpointing; caching is off")
            return None
        return RoutedCache(self.num_text_layers, cfg)

    def _decode_step(self, cache: RoutedCache, input_ids, pixel_values, attention_mask, position_ids, hidden_out=None):
        """New text tokens against a filled RoutedCache -> final-norm hidden states (B, n, D). A generated
        image token id without pixels is an ordinary token embedding here, as in the stock model's decode."""
        B, n = input_ids.shape
        if pixel_values is not None:
            raise DPVRError(
                "image input after the prompt (pixel_values while decoding) is not supported by the routed "
                "cache; put every image in the prompt"
            )
        if attention_mask is not None:
            if attention_mask.shape != (B, cache.seen + n):
                raise DPVRError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but the cache has seen {cache.seen} "
                    f"positions plus {n} new: expected {(B, cache.seen + n)}"
                )
            full_valid = attention_mask.bool()
        else:
            full_valid = torch.ones(B, cache.seen + n, dtype=torch.bool, device=input_ids.device)
        pos = bb.decode_positions(self.backbone, full_valid, n, position_ids, cache.rope_deltas)
        embeds = self.model.get_input_embeddings()(input_ids)
        lm = self.model.language_model
        return routed_decode(lm, self.dpvr_config, cache, embeds, full_valid[:, -n:], pos, hidden_out)

    def _merge_image_features(self, input_ids, pixel_values, inputs: dict):
        """Embeddings (B, T, D) with image features scattered onto image-token positions."""
        embeds = self.model.get_input_embeddings()(input_ids)
        is_img = input_ids == self.config.image_token_id  # (B, T)
        n_tokens = int(is_img.sum())
        feats, n_images = bb.image_features(self, self.backbone, pixel_values, inputs)  # (N_image_tokens, D)
        if feats is None:
            if n_tokens:
                raise DPVRError(
                    f"the prompt has {n_tokens} image tokens (id {self.config.image_token_id}) but no pixel_values"
                )
            return embeds, is_img, None
        if n_tokens == 0:
            raise DPVRError(
                f"pixel_values for {n_images} image(s) given but the prompt has no image token "
                f"(id {self.config.image_token_id})"
            )
        if feats.shape[0] != n_tokens:
            per_row = is_img.sum(1).tolist()
            raise DPVRError(
                f"image tokens and image features do not match: {n_tokens} image tokens in the prompt(s) "
                f"(per row {per_row}) vs {feats.shape[0]} features from {n_images} image(s)"
            )
        embeds = embeds.masked_scatter(is_img[..., None], feats.to(embeds.device, embeds.dtype))
        return embeds, is_img, feats

    # ------------------------------------------------------------------ generation
    def generate(self, *args, **kwargs):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask[:, -1].all()):
            rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
            raise DPVRError(f"rows {rows} are right-padded: generation continues after the last token, so pad "
                            "on the left (processor/tokenizer padding_side='left')")  # fmt: skip
        if self.dpvr_config.mode != "vanilla":
            routed_inputs.check_generate(self.generation_config, kwargs)
        # an explicit None is "not given": generate() would otherwise encode pixel_values=None up front
        # (its pre-encoding of images for forwards that take mm_encoder_outputs) and crash in the tower
        return super().generate(*args, **{k: v for k, v in kwargs.items() if v is not None})

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() gets a RoutedCache in routed modes (use_cache=False recomputes every step, as the
        paper's code does); vanilla keeps the stock DynamicCache."""
        if self.dpvr_config.mode == "vanilla":
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        given = model_kwargs.get(GENERATE_CACHE_KEY)
        if given is not None and not isinstance(given, RoutedCache):
            raise DPVRError(f"mode {self.dpvr_config.mode!r} generates with a RoutedCache, not {type(given).__name__}")
        if given is None and generation_config.use_cache:
            model_kwargs[GENERATE_CACHE_KEY] = RoutedCache(self.num_text_layers, self.dpvr_config)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # Qwen2-VL continues a cached conversation from `self.model.rope_deltas`, which the last prompt
        # generated for set, maybe another conversation's; the RoutedCache holds this one's own deltas
        cache = model_kwargs.get(GENERATE_CACHE_KEY)
        if self.backbone.mrope and isinstance(cache, RoutedCache) and cache.seen and cache.rope_deltas is not None:
            self.model.rope_deltas = cache.rope_deltas
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    # ------------------------------------------------------------------ training helpers
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **options):
        """transformers' activation checkpointing, without its input-embedding grad hook. Every version
        reaches this: before 5.23 through `gradient_checkpointing_enable` (below), after it through the
        deprecated alias of that name, which calls this one."""
        stock_checkpointing_enable(super(), activation_checkpointing_kwargs, **options)
        # transformers also makes the input embeddings require grad, so that *reentrant* checkpoints
        # of a frozen stack still reach trainable weights (PEFT's case). dpvr checkpoints its layers
        # non-reentrantly, so here that hook only sends the backward pass through every frozen layer
        # below the side branch (the whole shared stack): measured, it erased LF's training saving.
        if hasattr(self, "_require_grads_hook"):
            self.disable_input_require_grads()

    if not CHECKPOINTING_RENAMED:  # 5.16-5.22: the Trainer enables it by this name, which does the work itself

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **options):
            self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def apply_freeze(self) -> None:
        cfg = self.dpvr_config
        train_all = cfg.freeze == "none"
        for p in self.parameters():
            p.requires_grad_(train_all)
        if self.side_branch is not None:
            self.side_branch.requires_grad_(True)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory, side_branch_only: bool = False, **kwargs):
        if side_branch_only:  # a state_dict= holds the side branch's weights alone (its own keys)
            guards.check_side_branch_only_save(self.dpvr_config)
            return save_adapter(self, save_directory, kwargs.get("state_dict"))
        return super().save_pretrained(save_directory, **kwargs)


def _valid_mask(attention_mask, input_ids, is_img) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise DPVRError(f"attention_mask must be 2D {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    valid = attention_mask.bool()
    empty = (~valid.any(1)).nonzero().flatten().tolist()
    if empty:
        raise DPVRError(f"attention_mask rows {empty} are all zeros (no token to attend to)")
    masked_img = (is_img & ~valid).any(1).nonzero().flatten().tolist()
    if masked_img:
        raise DPVRError(f"attention_mask masks out image tokens in rows {masked_img} (padding inside an image span)")
    return valid

