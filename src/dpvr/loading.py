"""Loading a model + processor from command-line options: the one way every command does it.

    parser = argparse.ArgumentParser(); add_model_arguments(parser)
    model, processor = load_model(**model_kwargs(parser.parse_args()))

`--model` is a stock checkpoint of a routed family (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL,
Qwen2.5-VL), a full DPVR checkpoint, or (with `--adapter DIR`) the base for a side-branch-only
checkpoint; default: the embedded tiny LLaVA. `--mode` converts a stock model on
the fly (FastV/VTW need no training; PC/KV/LF without an adapter get an untrained side branch).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, PreTrainedModel

from dpvr.config import MODE_TRAITS, ROUTING_FIELDS, DPVRConfig, default_split, routing_default
from dpvr.errors import DPVRError, DPVRWarning
from dpvr.model_flags import add_model_arguments, model_kwargs, resolve_device  # noqa: F401 (re-exported)
from dpvr.routing import DPVRForConditionalGeneration, convert
from dpvr.routing.adapter import ADAPTER_CONFIG, DPVR_PREFIX
from dpvr.routing.backbones import backbone_of
from dpvr.routing.schedule import compile_schedule, summary

def resolve_model_path(model: str | None) -> str:
    if model is not None:
        _check_local_path("--model", model)
        return model
    from dpvr.embedded import default_model_path

    return str(default_model_path())


def load_model(
    model: str | None = None,
    adapter: str | None = None,
    routing: DPVRConfig | None = None,
    attn: str = "sdpa",
    dtype: str = "float32",
    device: str = "cpu",
    **fields,
) -> tuple[PreTrainedModel, object]:
    """(model in eval mode on `device`, processor). `routing` converts a stock model; its fields can also
    come as keywords, as the routing flags give them (`model_kwargs`: mode=..., split_layer=None, ...).
    mode=None (the default) keeps a model's own routing, and a stock model stays stock."""
    unknown = sorted(set(fields) - set(ROUTING_FIELDS))
    if unknown:
        raise TypeError(f"load_model() got unexpected keyword argument(s) {unknown}; routing fields: {ROUTING_FIELDS}")
    if routing is not None:
        if fields:  # which would win is a guess either way
            raise TypeError(f"load_model(): pass routing= or its fields ({sorted(fields)}), not both")
        fields = routing.to_dict()
    mode = fields.pop("mode", None)
    path = resolve_model_path(model)
    load = dict(dtype=getattr(torch, dtype), attn_implementation=attn)
    if adapter is not None:
        _check_local_path("--adapter", adapter)
        if not any((Path(adapter) / f).is_file() for f in ("dpvr_adapter.json", "adapter_config.json")):
            raise DPVRError(f"--adapter {adapter} holds neither dpvr_adapter.json (a DPVR side branch) nor "
                            "adapter_config.json (a PEFT LoRA); pass the folder a training run wrote (OUT/final)")  # fmt: skip
        base = load_stock(path, **load)
        if (Path(adapter) / "adapter_config.json").exists():  # a PEFT (LoRA) baseline: merge it in
            from peft import PeftModel

            if mode is not None:
                raise DPVRError(f"--mode {mode} conflicts with --adapter {adapter}, a LoRA baseline (no routing)")
            net = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        else:
            net = _in_mode(DPVRForConditionalGeneration.from_pretrained(adapter, base_model=base), mode)
        processor_path = path
    elif str(_model_type(path)).startswith(DPVR_PREFIX):
        if mode is not None:
            raise DPVRError(f"--mode {mode} conflicts with {path}, a DPVR checkpoint with its own routing")
        net = DPVRForConditionalGeneration.from_pretrained(path, **load)
        processor_path = net.config.base_model_name_or_path or path
    else:
        net = load_stock(path, **load)
        if mode is not None:  # no split given: None, which convert resolves for this model (as the flags do)
            net = convert(net, DPVRConfig.from_dict({"split_layer": None, **fields, "mode": mode, "shallow_fastv": False}))
        processor_path = path
    if fields.get("shallow_fastv"):
        net = _with_shallow_fastv(net, fields)
    processor = AutoProcessor.from_pretrained(_first_with_processor(path, processor_path))
    if adapter is None and mode is not None:  # converted here, and nothing refused it: say what it runs
        _warn_if_untrained(net.dpvr_config)
    return net.to(resolve_device(device)).eval(), processor


def _warn_if_untrained(cfg: DPVRConfig) -> None:
    lf_ideal = cfg.mode == "lf" and cfg.fusion_layers == 0 and not cfg.fusion_at  # its side branch is never read
    if cfg.has_side_branch and not lf_ideal:
        init = f"copies of layers {cfg.split_layer}..{cfg.split_layer + cfg.side_depth - 1}" if cfg.side_init == "copy" \
            else "randomly initialised"
        warnings.warn(f"--mode {cfg.mode} on a stock checkpoint runs an untrained side branch ({init}, split "
                      f"{cfg.split_layer}): pass --adapter OUT/final from `dpvr train`, or a trained DPVR checkpoint "
                      "as --model", DPVRWarning, stacklevel=3)  # fmt: skip


def _in_mode(net: DPVRForConditionalGeneration, mode: str | None) -> DPVRForConditionalGeneration:
    """A loaded side branch run in its own mode, or (`mode`) in its twin's (PC <-> KV: same text outputs)."""
    own = net.dpvr_config.mode
    if mode is None or mode == own:
        return net
    if MODE_TRAITS[own].twin != mode:
        raise DPVRError(f"--mode {mode} conflicts with --adapter, a {own} side branch (it records its own routing; "
                        "only pc and kv exchange side branches)")  # fmt: skip
    net.config.dpvr = net.dpvr_config.with_routing(mode=mode)
    return net


def _with_shallow_fastv(net, fields: dict) -> DPVRForConditionalGeneration:
    """Compose FastV pruning of the shared layers (fields' fastv_layer and fastv_ratio) with the routing the
    model already has (inference only)."""
    if not isinstance(net, DPVRForConditionalGeneration):
        raise DPVRError("--shallow-fastv composes with lf/pc/kv/vtw routing; this model is stock (add --mode or --adapter)")
    pruning = {k: fields.get(k, routing_default(k)) for k in ("fastv_layer", "fastv_ratio")}
    cfg = net.dpvr_config.with_routing(shallow_fastv=True, **pruning)
    cfg.validate_for(net.config.text_config.num_hidden_layers)  # refuses fastv/vanilla routing, naming it
    net.config.dpvr = cfg
    return net


def load_stock(path: str, **load) -> PreTrainedModel:
    """A stock checkpoint of a routed family, with its own class (refusing other model types by name)."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise DPVRError(f"--model {path}: cannot read its config ({str(exc).splitlines()[0]})") from None
    return backbone_of(config).stock.from_pretrained(path, **load)


def describe(model, plan: bool = False) -> str:
    """One line: which routing a loaded model runs (its mode's fields, per MODE_TRAITS); with `plan`,
    also its layer schedule for an image prompt, e.g. "[layers 0-5 all | side x1 image | ...]"."""
    if not isinstance(model, DPVRForConditionalGeneration):
        return "vanilla (stock)"
    c, L = model.dpvr_config, model.config.text_config.num_hidden_layers
    t = MODE_TRAITS[c.mode]
    parts = [f"{c.mode}{' (LF-ideal)' if c.is_lf_ideal else ''}"]
    parts += [f"s={c.split_layer}"] if t.split else []
    if t.fusion:
        parts.append(f"fusion_at={','.join(map(str, c.fusion_at))}" if c.fusion_at else f"K={c.fusion_layers}")
    parts += [f"D={c.side_depth}"] if t.side_branch else []
    parts += [f"layer={c.fastv_layer} ratio={c.fastv_ratio}"] if t.fastv else []
    parts += [f"+FastV@{c.fastv_layer} ratio={c.fastv_ratio} in [0, s)"] if c.shallow_fastv else []
    parts += [f"[{summary(compile_schedule(c, L))}]"] if plan else []
    return " ".join(parts)


def _model_type(path: str) -> str | None:
    config = Path(path) / "config.json"
    if config.exists():
        try:
            return json.loads(config.read_text()).get("model_type")
        except ValueError as exc:  # truncated or hand-edited: name the file, not just the JSON position
            raise DPVRError(f"{config} is not valid JSON ({exc}); re-save the checkpoint") from None
    if (Path(path) / ADAPTER_CONFIG).exists():
        raise DPVRError(f"{path} is an adapter: pass it as --adapter with its base as --model")
    return None  # a hub id: transformers resolves it


def _check_local_path(flag: str, path: str) -> None:
    """A path that cannot be a hub id (org/name) must exist: say so instead of transformers' repo-id message."""
    p = Path(path).expanduser()
    looks_local = p.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1 or "\\" in path
    if not p.exists() and looks_local:
        raise DPVRError(f"{flag} {path}: no such file or folder (a hub model id looks like org/name)")
    if p.exists() and not p.is_dir():
        raise DPVRError(f"{flag} {path} is a file; pass the checkpoint folder")


def _first_with_processor(*paths: str) -> str:
    for p in paths:
        if p and (not Path(p).exists() or (Path(p) / "preprocessor_config.json").exists()
                  or (Path(p) / "processor_config.json").exists()):  # fmt: skip
            return p
    return paths[0]


__all__ = ["add_model_arguments", "default_split", "describe", "load_model", "load_stock", "model_kwargs"]
