"""DPVRForConditionalGeneration: a stock HF LLaVA whose language model routes vision tokens.

    from transformers import LlavaForConditionalGeneration
    from dpvr import DPVRConfig, convert
    model = convert(LlavaForConditionalGeneration.from_pretrained(path), DPVRConfig(mode="lf", split_layer=18))
    model.print_trainable_parameters()             # the side branch only, as in the paper
    model.save_pretrained(d)                       # whole model; DPVRForConditionalGeneration.from_pretrained(d)
    model.save_pretrained(d, side_branch_only=True)  # adapter: config + side-branch weights

It subclasses `LlavaForConditionalGeneration`, so the vision tower, projector, `generate`, the Trainer
and device maps work unchanged; only `forward` differs (mode 'vanilla' is the stock forward itself).
The routed decoder loop lives in `dpvr.routing.forward`; adapter files in `dpvr.routing.adapter`.
"""
from __future__ import annotations

import contextlib
import copy
import json

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
from transformers.utils import cached_file, logging

from dpvr.config import DPVRConfig
from dpvr.errors import DPVRError
from dpvr.routing.adapter import ADAPTER_CONFIG, DPVR_MODEL_TYPE, load_adapter, save_adapter
from dpvr.routing.cache import RoutedCache
from dpvr.routing.forward import routed_decode, routed_decoder
from dpvr.routing.layer import check_backbone, check_supported
from dpvr.routing.side import SideBranch, active_side_branch, build_side_branch
from dpvr.routing.stock_guard import install as install_stock_guard

logger = logging.get_logger(__name__)


@strict
class DPVRLlavaConfig(LlavaConfig):
    """A LlavaConfig plus the routing. Its own model_type, so a stock loader never silently drops the
    side branch: loading a DPVR checkpoint needs `import dpvr`."""

    model_type = DPVR_MODEL_TYPE
    dpvr: dict | None = None
    base_model_name_or_path: str | None = None


class DPVRForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = DPVRLlavaConfig

    def __init__(self, config: DPVRLlavaConfig):
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
        return DPVRConfig.from_dict(self.config.dpvr or {})

    @contextlib.contextmanager
    def routing(self, **overrides):
        """Temporarily run with other routing fields on the same weights, e.g.
        `with model.routing(mode="vanilla"): ...` or `model.routing(mode="fastv", fastv_ratio=0.75)`."""
        saved = self.config.dpvr
        cfg = self.dpvr_config.with_routing(**overrides)
        cfg.validate_for(len(self.model.language_model.layers))
        if cfg.has_side_branch and self.side_branch is None:
            raise DPVRError(f"mode {cfg.mode!r} needs a side branch; this model was converted without one")
        depth = len(active_side_branch(self.side_branch)) if cfg.has_side_branch else cfg.side_depth
        if depth != cfg.side_depth:
            raise DPVRError(f"side_depth={cfg.side_depth} but the side branch has {depth} layers")
        self.config.dpvr = cfg.to_dict()
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
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        labels=None,
        logits_to_keep=0,
        image_sizes=None,
        use_cache=None,
        output_hidden_states=None,
        output_attentions=None,
        **kwargs,
    ):
        cfg = self.dpvr_config
        if cfg.mode == "vanilla":
            return super().forward(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                position_ids=position_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                vision_feature_layer=vision_feature_layer, labels=labels,
                vision_feature_select_strategy=vision_feature_select_strategy, logits_to_keep=logits_to_keep,
                image_sizes=image_sizes, use_cache=use_cache, output_hidden_states=output_hidden_states,
                output_attentions=output_attentions, **kwargs,
            )  # fmt: skip
        if input_ids is None:
            raise DPVRError("routing needs input_ids (to find image positions); inputs_embeds alone is not supported")
        if output_attentions:
            raise NotImplementedError(
                "output_attentions is not available under routing (layers see different token sets); "
                "use `dpvr analyze` for attention statistics, or mode='vanilla'"
            )
        cache = self._routed_cache(past_key_values, use_cache, input_ids.shape[0])
        all_hidden = [] if output_hidden_states else None
        if cache is not None and cache.seen > 0:
            hidden = self._decode_step(cache, input_ids, pixel_values, attention_mask, position_ids, all_hidden)
            out, image_features = None, None
        else:
            embeds, is_img, image_features = self._merge_image_features(
                input_ids, pixel_values, vision_feature_layer, vision_feature_select_strategy, image_sizes
            )
            valid = _valid_mask(attention_mask, input_ids, is_img)
            pos = _position_ids(position_ids, valid)
            out = routed_decoder(
                self.model.language_model,
                active_side_branch(self.side_branch),
                cfg,
                embeds,
                is_img,
                valid,
                pos,
                checkpointing=self.is_activation_checkpointing and self.training,
                keep_hidden=bool(output_hidden_states),
                keep_kv=cache is not None,
            )
            if cache is not None:
                cache.fill(out.layer_kv, seq_len=input_ids.shape[1], dense=bool(valid.all()))
            hidden, all_hidden = out.hidden, out.all_hidden
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # num_items_in_batch (Trainer: supervised tokens of the whole step, all micro-batches and ranks), as stock
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))  # fmt: skip
        return LlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=cache,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            image_hidden_states=image_features,
        )

    def _routed_cache(self, past_key_values, use_cache, batch: int) -> RoutedCache | None:
        """The RoutedCache to read/fill, a new one when asked for, or None (no caching)."""
        cfg = self.dpvr_config
        if isinstance(past_key_values, RoutedCache):
            past_key_values.check_compatible(cfg, batch)
            return past_key_values
        if past_key_values is not None and not _is_empty_cache(past_key_values):
            raise DPVRError(
                f"mode {cfg.mode!r} cannot continue from a {type(past_key_values).__name__}: its layers hold "
                "the stock model's token sets; use the RoutedCache that generate() creates, or use_cache=False"
            )
        if not use_cache:
            return None
        if self.training and self.is_activation_checkpointing:
            logger.warning_once("use_cache=True is incompatible with activation checkpointing; caching is off")
            return None
        return RoutedCache(len(self.model.language_model.layers), cfg)

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
        if position_ids is None:
            position_ids = (full_valid.long().cumsum(-1) - 1)[:, -n:]
        elif position_ids.shape[-1] != n:
            raise DPVRError(f"position_ids must cover the {n} new tokens, got shape {tuple(position_ids.shape)}")
        embeds = self.model.get_input_embeddings()(input_ids)
        lm = self.model.language_model
        return routed_decode(lm, self.dpvr_config, cache, embeds, full_valid[:, -n:], position_ids.expand(B, n), hidden_out)

    def _merge_image_features(self, input_ids, pixel_values, feature_layer, strategy, image_sizes):
        """Embeddings (B, T, D) with image features scattered onto image-token positions."""
        embeds = self.model.get_input_embeddings()(input_ids)
        is_img = input_ids == self.config.image_token_id  # (B, T)
        n_tokens = int(is_img.sum())
        if pixel_values is None:
            if n_tokens:
                raise DPVRError(
                    f"the prompt has {n_tokens} image tokens (id {self.config.image_token_id}) but no pixel_values"
                )
            return embeds, is_img, None
        if n_tokens == 0:
            raise DPVRError(
                f"pixel_values for {pixel_values.shape[0]} image(s) given but the prompt has no image token "
                f"(id {self.config.image_token_id})"
            )
        feats = self.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=feature_layer,
            vision_feature_select_strategy=strategy, image_sizes=image_sizes, return_dict=True,
        ).pooler_output  # fmt: skip
        feats = torch.cat(list(feats), dim=0)  # (N_images * tokens_per_image, D)
        if feats.shape[0] != n_tokens:
            per_row = is_img.sum(1).tolist()
            raise DPVRError(
                f"image tokens and image features do not match: {n_tokens} image tokens in the prompt(s) "
                f"(per row {per_row}) vs {feats.shape[0]} features from {pixel_values.shape[0]} image(s)"
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
        return super().generate(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() gets a RoutedCache in routed modes (use_cache=False recomputes every step, as the
        paper's code does); vanilla keeps the stock DynamicCache."""
        if self.dpvr_config.mode == "vanilla":
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        given = model_kwargs.get("past_key_values")
        if given is not None and not isinstance(given, RoutedCache):
            raise DPVRError(f"mode {self.dpvr_config.mode!r} generates with a RoutedCache, not {type(given).__name__}")
        if given is None and generation_config.use_cache:
            model_kwargs["past_key_values"] = RoutedCache(len(self.model.language_model.layers), self.dpvr_config)

    # ------------------------------------------------------------------ training helpers
    def _activation_checkpointing_enable(self, *args, **kwargs):
        super()._activation_checkpointing_enable(*args, **kwargs)
        # transformers also makes the input embeddings require grad, so that *reentrant* checkpoints
        # of a frozen stack still reach trainable weights (PEFT's case). dpvr checkpoints its layers
        # non-reentrantly, so here that hook only sends the backward pass through every frozen layer
        # below the side branch (the whole shared stack): measured, it erased LF's training saving.
        if hasattr(self, "_require_grads_hook"):
            self.disable_input_require_grads()

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
        if side_branch_only:
            return save_adapter(self, save_directory)
        return super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, path, *args, base_model=None, dpvr_config: DPVRConfig | None = None, **kwargs):
        """Load a full DPVR checkpoint, an adapter (on `base_model` or its recorded base), or a stock
        LLaVA checkpoint converted with `dpvr_config`. Refuses anything that would leave weights random."""
        from dpvr.routing.adapter import override_routing

        adapter_cfg = cached_file(str(path), ADAPTER_CONFIG, _raise_exceptions_for_missing_entries=False)
        if adapter_cfg is not None:
            return override_routing(load_adapter(path, convert, base_model=base_model, **kwargs), dpvr_config, path)
        config_file = cached_file(str(path), "config.json", _raise_exceptions_for_missing_entries=False)
        if config_file is None or base_model is not None:  # base_model= is for adapters only
            what = "a DPVR adapter" if base_model is not None else "a DPVR adapter or checkpoint (no config.json either)"
            raise DPVRError(f"{path} has no {ADAPTER_CONFIG}: not {what}")
        with open(config_file) as f:
            model_type = json.load(f).get("model_type")
        if model_type == "llava":
            if dpvr_config is None:
                raise DPVRError(f"{path} is a stock LLaVA checkpoint: pass dpvr_config=DPVRConfig(...) to convert it")
            return convert(LlavaForConditionalGeneration.from_pretrained(path, *args, **kwargs), dpvr_config)
        if model_type != DPVRLlavaConfig.model_type:
            raise NotImplementedError(f"{path} has model_type {model_type!r}; dpvr supports 'llava' checkpoints")
        kwargs.pop("output_loading_info", None)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise DPVRError(f"checkpoint {path} does not match the model: {_short(bad)}")
        model.apply_freeze()
        return override_routing(model, dpvr_config, path)


def convert(base: LlavaForConditionalGeneration, config: DPVRConfig) -> DPVRForConditionalGeneration:
    """Wrap a loaded stock LLaVA with routing. The result shares (takes over) the base's modules:
    no weight is copied except the side branch's initial layers. Freezes per `config.freeze`."""
    if not isinstance(config, DPVRConfig):
        raise DPVRError(f"convert() needs a DPVRConfig, got {type(config).__name__}")
    if isinstance(base, DPVRForConditionalGeneration):
        raise DPVRError("the model is already converted; convert the stock LlavaForConditionalGeneration")
    model_type = getattr(base.config, "model_type", None)
    if not isinstance(base, LlavaForConditionalGeneration) or model_type != "llava":
        raise NotImplementedError(
            f"dpvr supports LlavaForConditionalGeneration (llava-1.5 style); got {type(base).__name__} "
            f"(model_type {model_type!r}). LLaVA-NeXT anyres and Qwen2-VL mrope are not supported yet."
        )
    check_backbone(base.config.text_config)
    layers = base.model.language_model.layers
    config.validate_for(len(layers))
    for layer in layers:
        check_supported(layer)

    fields = {k: v for k, v in base.config.to_dict().items() if k not in ("model_type", "transformers_version")}
    new_config = DPVRLlavaConfig(**fields, dpvr=config.to_dict(), base_model_name_or_path=base.name_or_path)
    with torch.device("meta"):
        model = DPVRForConditionalGeneration(new_config)
    # share the base's sub-configs (attention implementation included): the taken-over modules read them
    model.config.text_config, model.config.vision_config = base.config.text_config, base.config.vision_config
    model.config._attn_implementation_internal = base.config._attn_implementation_internal
    model.model, model.lm_head = base.model, base.lm_head  # take over, no copy
    model.side_branch = build_side_branch(base, config)
    model.generation_config = copy.deepcopy(base.generation_config)
    model.name_or_path = base.name_or_path
    if next(base.parameters()).device.type != "meta":  # a meta base (shape-only analysis) stays meta
        meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
        assert not meta, f"convert left meta tensors: {meta[:5]}"
    model.train(base.training)
    model.apply_freeze()
    return model


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


def _position_ids(position_ids, valid) -> torch.Tensor:
    B, T = valid.shape
    if position_ids is None:
        if bool(valid.all()):
            return torch.arange(T, device=valid.device).expand(B, T)
        # left padding: count only real tokens, as generate() does
        return (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
    if position_ids.dim() != 2 or position_ids.shape[-1] != T or position_ids.shape[0] not in (1, B):
        raise DPVRError(f"position_ids must be (B, T)=({B}, {T}) or (1, {T}), got {tuple(position_ids.shape)}")
    return position_ids.expand(B, T)


def _is_empty_cache(cache) -> bool:
    return hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0


def _short(info: dict) -> str:
    return "; ".join(f"{k}: {list(v)[:4]}{' ...' if len(v) > 4 else ''} ({len(v)})" for k, v in info.items())


AutoConfig.register(DPVRLlavaConfig.model_type, DPVRLlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(DPVRLlavaConfig, DPVRForConditionalGeneration, exist_ok=True)
install_stock_guard(DPVRLlavaConfig.model_type)
