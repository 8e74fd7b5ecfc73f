"""The DPVR classes: one per family of `dpvr.routing.backbones.BACKBONES`, and `convert`.

    from transformers import Qwen2VLForConditionalGeneration
    from dpvr import DPVRConfig, DPVRForConditionalGeneration, convert
    model = convert(Qwen2VLForConditionalGeneration.from_pretrained(path), DPVRConfig(mode="lf", split_layer=18))
    model.print_trainable_parameters()               # the side branch only, as in the paper
    model.save_pretrained(d)                         # whole model; DPVRForConditionalGeneration.from_pretrained(d)
    model.save_pretrained(d, side_branch_only=True)  # adapter: config + side-branch weights

Each family's class is `DPVR<stock class>` (e.g. `DPVRQwen2VLForConditionalGeneration`), a subclass of
`DPVRForConditionalGeneration` and of the stock class, with a config of its own model_type
(`dpvr_<stock model_type>`), so a stock loader never silently drops the side branch: loading a DPVR
checkpoint needs `import dpvr`. `DPVRForConditionalGeneration.from_pretrained` loads any of them.
"""
from __future__ import annotations

import copy
import inspect
import json

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.utils import cached_file

from dpvr.config import DPVRConfig
from dpvr.errors import DPVRError
from dpvr.routing.adapter import ADAPTER_CONFIG, DPVR_PREFIX, load_adapter, override_routing
from dpvr.routing.backbones import BACKBONES, Backbone, backbone_of, check_text_model
from dpvr.routing.layer import check_supported
from dpvr.routing.guards import check_attention
from dpvr.routing.model import RoutedModel
from dpvr.routing.side import build_side_branch
from dpvr.routing.stock_guard import install as install_stock_guard


class DPVRForConditionalGeneration(RoutedModel):
    """The base of every DPVR class (isinstance works across families) and the one loader of them all."""

    @classmethod
    def from_pretrained(cls, path, *args, base_model=None, dpvr_config: DPVRConfig | None = None, **kwargs):
        """Load a full DPVR checkpoint, an adapter (on `base_model` or its recorded base), or a stock
        checkpoint of a routed family converted with `dpvr_config`. Refuses anything that would leave
        weights random."""
        adapter_cfg = cached_file(str(path), ADAPTER_CONFIG, _raise_exceptions_for_missing_entries=False)
        if adapter_cfg is not None:
            return override_routing(load_adapter(path, convert, base_model=base_model, **kwargs), dpvr_config, path)
        config_file = cached_file(str(path), "config.json", _raise_exceptions_for_missing_entries=False)
        if config_file is None or base_model is not None:  # base_model= is for adapters only
            what = "a DPVR adapter" if base_model is not None else "a DPVR adapter or checkpoint (no config.json either)"
            raise DPVRError(f"{path} has no {ADAPTER_CONFIG}: not {what}")
        with open(config_file) as f:
            try:
                model_type = json.load(f).get("model_type")
            except ValueError as exc:  # truncated or hand-edited: name the file, not just the JSON position
                raise DPVRError(f"{config_file} is not valid JSON ({exc}); re-save the checkpoint") from None
        base_type = str(model_type).removeprefix(DPVR_PREFIX)
        stock, family = base_type == model_type, DPVR_CLASSES.get(base_type)
        if family is None:
            raise NotImplementedError(f"{path} has model_type {model_type!r}; dpvr supports {', '.join(BACKBONES)} "
                                      "checkpoints and their DPVR conversions")  # fmt: skip
        if not issubclass(family, cls):
            raise DPVRError(f"{path} holds a {model_type} model, which {cls.__name__} cannot load; "
                            "use DPVRForConditionalGeneration.from_pretrained")  # fmt: skip
        if stock:
            if dpvr_config is None:
                raise DPVRError(f"{path} is a stock {family.backbone.stock.__name__} checkpoint: pass "
                                "dpvr_config=DPVRConfig(...) to convert it")  # fmt: skip
            return convert(family.backbone.stock.from_pretrained(path, *args, **kwargs), dpvr_config)
        kwargs.pop("output_loading_info", None)
        model, info = super(DPVRForConditionalGeneration, family).from_pretrained(
            path, *args, output_loading_info=True, **kwargs
        )
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise DPVRError(f"checkpoint {path} does not match the model: {_short(bad)}")
        model.apply_freeze()
        return override_routing(model, dpvr_config, path)


class TypedRouting:
    """In front of each DPVR config class: `config.dpvr` is the model's DPVRConfig itself, so a forward
    reads it as it is; a dict (config.json, or a caller that assigns one) becomes a DPVRConfig on the way
    in, and `to_dict` (what save_pretrained writes) turns it back into a dict."""

    def __setattr__(self, name, value):
        if name == "dpvr" and isinstance(value, dict):
            value = DPVRConfig.from_dict(value)
        super().__setattr__(name, value)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if isinstance(out.get("dpvr"), DPVRConfig):
            out["dpvr"] = out["dpvr"].to_dict()
        return out


def _family(backbone: Backbone) -> type:
    """The DPVR config and model classes of one family, registered with the Auto classes."""
    stock, stock_config = backbone.stock, backbone.stock.config_class
    config_cls = strict(type(f"DPVR{stock_config.__name__}", (TypedRouting, stock_config), {
        "__module__": __name__,
        "__doc__": f"A {stock_config.__name__} plus the routing (a DPVRConfig, and the base it came from).",
        "model_type": DPVR_PREFIX + backbone.model_type,
        "__annotations__": {"dpvr": "DPVRConfig | None", "base_model_name_or_path": "str | None"},
        "dpvr": None,
        "base_model_name_or_path": None,
    }))  # fmt: skip
    model_cls = type(f"DPVR{stock.__name__}", (DPVRForConditionalGeneration, stock), {
        "__module__": __name__, "config_class": config_cls, "backbone": backbone, "forward": _stock_signature(stock),
        "__doc__": f"A stock {stock.__name__} whose language model routes vision tokens (see DPVRConfig).",
    })  # fmt: skip
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForImageTextToText.register(config_cls, model_cls, exist_ok=True)
    install_stock_guard(stock, config_cls.model_type)
    return model_cls


def _stock_signature(stock: type):
    """RoutedModel.forward under the stock forward's signature: positional arguments bind in the stock
    order, and generate() sees the family's inputs (image_sizes, image_grid_thw, ...) as model inputs."""
    signature = inspect.signature(stock.forward)

    def forward(self, *args, **kwargs):
        if not args:  # by keyword, as generate() and the Trainer call it: the names are the stock ones already
            return RoutedModel.forward(self, **kwargs)
        bound = signature.bind(self, *args, **kwargs).arguments
        bound.pop("self")
        return RoutedModel.forward(self, **bound.pop("kwargs", {}), **bound)

    forward.__signature__, forward.__doc__ = signature, RoutedModel.forward.__doc__
    return forward


# stock model_type -> its DPVR class
DPVR_CLASSES: dict[str, type[DPVRForConditionalGeneration]] = {t: _family(b) for t, b in BACKBONES.items()}
DPVRLlavaForConditionalGeneration = DPVR_CLASSES["llava"]
DPVRLlavaConfig = DPVRLlavaForConditionalGeneration.config_class
globals().update({c.__name__: c for c in DPVR_CLASSES.values()})  # importable by name (pickling, repr)
globals().update({c.config_class.__name__: c.config_class for c in DPVR_CLASSES.values()})


def convert(base, config: DPVRConfig) -> DPVRForConditionalGeneration:
    """Wrap a loaded stock model of a routed family with routing. The result shares (takes over) the
    base's modules: no weight is copied except the side branch's initial layers. Freezes per `config.freeze`."""
    if not isinstance(config, DPVRConfig):
        raise DPVRError(f"convert() needs a DPVRConfig, got {type(config).__name__}")
    if isinstance(base, DPVRForConditionalGeneration):
        raise DPVRError(f"the model is already converted; convert the stock {base.backbone.stock.__name__}")
    backbone = backbone_of(base)
    if not isinstance(base, backbone.stock):
        raise NotImplementedError(f"dpvr routes {backbone.stock.__name__} for model_type {backbone.model_type!r}; "
                                  f"got {type(base).__name__}")  # fmt: skip
    check_text_model(backbone, base.config.text_config)
    layers = base.model.language_model.layers
    config = config.resolve_for(base.config)  # split_layer=None: chosen here, once; the model keeps the result
    check_attention(base.config.text_config, config)
    for layer in layers:
        check_supported(layer)

    cls = DPVR_CLASSES[backbone.model_type]
    fields = {k: v for k, v in base.config.to_dict().items() if k not in ("model_type", "transformers_version")}
    new_config = cls.config_class(**fields, dpvr=config, base_model_name_or_path=base.name_or_path)
    with torch.device("meta"):
        model = cls(new_config)
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


def _short(info: dict) -> str:
    return "; ".join(f"{k}: {list(v)[:4]}{' ...' if len(v) > 4 else ''} ({len(v)})" for k, v in info.items())
