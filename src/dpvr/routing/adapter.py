"""Adapter-style checkpoints: the routing config plus the side branch's weights, nothing else.

Layout (PEFT-like):  DIR/side_branch.safetensors  and  DIR/dpvr_adapter.json, the JSON written last
and holding the weights' sha256, so a crash mid-save never leaves a folder that loads. The JSON also
records the base model's shape; loading onto a base of another shape is refused with the field named.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText
from transformers.utils import cached_file

from dpvr.atomic import atomic_write, atomic_write_text
from dpvr.config import DPVRConfig
from dpvr.errors import DPVRError
from dpvr.routing.backbones import DPVR_PREFIX

WEIGHTS = "side_branch.safetensors"
ADAPTER_CONFIG = "dpvr_adapter.json"
FORMAT_VERSION = 1


def base_fingerprint(config) -> dict:
    """The base-model facts an adapter depends on."""
    text, vision = config.text_config, config.vision_config
    return {
        "text_model_type": text.model_type,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", text.num_attention_heads),
        "intermediate_size": text.intermediate_size,
        "vocab_size": text.vocab_size,
        "vision_hidden_size": vision.hidden_size,
        "image_token_id": config.image_token_id,
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_adapter(model, save_directory, state_dict: dict | None = None) -> None:
    """state_dict: the side branch's weights (keys as in `model.side_branch.state_dict()`) when the module's
    own are not whole, e.g. gathered from the ranks of a sharded (FSDP, ZeRO-3) run."""
    if model.side_branch is None:
        raise DPVRError(f"mode {model.dpvr_config.mode!r} has no side branch to save; save the full model instead")
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    own = model.side_branch.state_dict()
    if state_dict is not None and set(state_dict) != set(own):
        differ = sorted(set(state_dict) ^ set(own))[:4]
        raise DPVRError(f"side-branch state_dict keys differ from the side branch's: {differ}")
    state = {f"side_branch.{k}": v.detach().contiguous().cpu() for k, v in (state_dict or own).items()}
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    meta = {
        "format_version": FORMAT_VERSION,
        "dpvr": model.dpvr_config.to_dict(),
        "base_model_name_or_path": model.config.base_model_name_or_path or model.name_or_path,
        "base_fingerprint": base_fingerprint(model.config),
        "weights_sha256": _sha256(out / WEIGHTS),
    }
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(meta, indent=2) + "\n")


def read_adapter_config(path) -> dict:
    file = cached_file(str(path), ADAPTER_CONFIG)
    try:
        with open(file) as f:
            meta = json.load(f)
    except ValueError as exc:  # truncated or hand-edited: name the file, not just the JSON position
        raise DPVRError(f"adapter config {file} is not valid JSON ({exc}); re-save the adapter") from None
    if not isinstance(meta, dict):
        raise DPVRError(f"adapter config {file} holds a {type(meta).__name__}, not an object; re-save the adapter")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DPVRError(f"adapter {path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    return meta


def load_adapter(path, convert: Callable, base_model=None, **load_kwargs):
    """convert(base_model (or the recorded base, loaded with load_kwargs), the adapter's routing), then
    load the side branch. `convert` is dpvr.routing.classes' (passed in: this module imports no model)."""
    meta = read_adapter_config(path)
    if base_model is None:
        base_path = meta.get("base_model_name_or_path")
        if not base_path:
            raise DPVRError(f"adapter {path} records no base model; pass base_model=")
        base_model = AutoModelForImageTextToText.from_pretrained(base_path, **load_kwargs)  # the stock class
    if str(getattr(base_model.config, "model_type", "")).startswith(DPVR_PREFIX):
        raise DPVRError("load an adapter onto the stock base model, not onto an already converted one")
    want, have = meta["base_fingerprint"], base_fingerprint(base_model.config)
    diff = [f"{k}: adapter {want[k]} vs base {have.get(k)}" for k in want if want[k] != have.get(k)]
    if diff:
        raise DPVRError(f"adapter {path} was trained on another base shape ({'; '.join(diff)})")
    weights = cached_file(str(path), WEIGHTS)
    if _sha256(Path(weights)) != meta["weights_sha256"]:
        raise DPVRError(f"adapter {path}: {WEIGHTS} does not match the checksum in {ADAPTER_CONFIG} (partial write?)")
    model = convert(base_model, DPVRConfig.from_dict(meta["dpvr"]))
    state = {k.removeprefix("side_branch."): v for k, v in load_file(weights).items()}
    expected = set(model.side_branch.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise DPVRError(f"adapter {path}: side-branch keys missing {missing[:4]} / unexpected {unexpected[:4]}")
    model.side_branch.load_state_dict(state, strict=True)
    model.name_or_path = str(path)  # what rebuilds this model (PEFT records it as its base; AutoPeftModel reloads it)
    return model


def override_routing(model, config: DPVRConfig | None, path):
    """`from_pretrained(saved_dpvr, dpvr_config=cfg)`: cfg replaces the saved routing, as a passed `config=`
    does in transformers, when the saved weights serve it (a mode without side branch, or the saved side
    branch's split_layer and side_depth); otherwise refuse, naming the fields: running a side branch
    trained for another split, or a fresh random one, would be a silent wrong answer."""
    if config is None:
        return model
    if not isinstance(config, DPVRConfig):
        raise DPVRError(f"dpvr_config must be a DPVRConfig, got {type(config).__name__}")
    saved, config = model.dpvr_config, config.resolve_for(model.config)  # no split given: the saved one
    if config.has_side_branch and model.side_branch is None:
        raise DPVRError(f"dpvr_config mode {config.mode!r} needs a side branch but {path} was saved with mode "
                        f"{saved.mode!r}, which has none; convert the stock base instead")  # fmt: skip
    diff = {k: (getattr(saved, k), getattr(config, k)) for k in ("split_layer", "side_depth")
            if config.has_side_branch and getattr(saved, k) != getattr(config, k)}  # fmt: skip
    if diff:
        raise DPVRError(f"dpvr_config does not fit the side branch saved in {path}: {diff} (saved, passed); "
                        "keep those fields or retrain")  # fmt: skip
    model.config.dpvr = config
    model.apply_freeze()
    return model
