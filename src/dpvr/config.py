"""DPVRConfig: which routing to apply to a LLaVA language model, and how.

Layers are numbered 0..L-1. With split s, fusion K and side depth D:
  - layers [0, s) run unchanged on every token;
  - the side branch (D trainable decoder layers) runs on the image positions alone;
  - `lf`:  layers [s, L-K) run on text only; at [L-K, L) the side-branch image states come back (fusion).
           K = 0 is DPVR-LF-ideal (no fusion layer; the side branch gets no gradient and is not run).
           `fusion_at=(i, j, ...)` (sparse fusion) puts the fusion layers there instead of the last K.
  - `pc`:  every layer in [s, L) first resets the image positions to the side-branch output.
  - `kv`:  in [s, L) image states stay fixed at the side-branch output and only give keys/values.
  - `vtw`: (baseline, no training) image tokens are withdrawn from layer s on.
  - `fastv`: (baseline, no training) after layer `fastv_layer` keep only the image tokens that the last
           text token attends to most, dropping `fastv_ratio` of them, for all later layers.
  - `vanilla`: the stock model.
  - `shallow_fastv=True` composes FastV pruning inside [0, s) with pc/kv/lf/vtw (beyond the paper).

Ranges that need the model's layer count are checked by `validate_for(num_layers)`, which `convert`
calls before touching the model.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable

from dpvr.errors import DPVRError



@dataclass(frozen=True)
class ModeTraits:
    """What a mode uses; its layer plan is `dpvr.routing.schedule`'s compile function for it."""

    split: bool  # shared layers [0, split_layer), then a routed deep part
    side_branch: bool  # owns a trainable side branch (side_depth, side_init)
    fusion: bool  # fuses the side branch back (fusion_layers / fusion_at)
    fastv: bool  # prunes image tokens FastV-style on its own (fastv_layer, fastv_ratio)
    # the mode whose text outputs equal this one's with the same side branch, so a side branch trained in
    # one runs in the other (PC's reset image states are what KV's keys/values read; tests/test_routing_equivalence.py)
    twin: str | None = None


MODE_TRAITS = {
    "vanilla": ModeTraits(split=False, side_branch=False, fusion=False, fastv=False),
    "pc": ModeTraits(split=True, side_branch=True, fusion=False, fastv=False, twin="kv"),
    "kv": ModeTraits(split=True, side_branch=True, fusion=False, fastv=False, twin="pc"),
    "lf": ModeTraits(split=True, side_branch=True, fusion=True, fastv=False),
    "vtw": ModeTraits(split=True, side_branch=False, fusion=False, fastv=False),
    "fastv": ModeTraits(split=False, side_branch=False, fusion=False, fastv=True),
}
MODES = tuple(MODE_TRAITS)
# modes that own a trainable side branch
SIDE_BRANCH_MODES = tuple(m for m, t in MODE_TRAITS.items() if t.side_branch)
SPLIT_MODES = tuple(m for m, t in MODE_TRAITS.items() if t.split)


@dataclass(frozen=True)
class DPVRConfig:
    """Frozen and normalised (sequences are tuples, ratios floats): two configs are the same routing
    iff they compare equal, however they were written (a list from JSON, an int ratio). Change one
    with `dataclasses.replace(cfg, ...)` (validated again); `to_dict()` is for saving.

    `split_layer=None` leaves the split to the model: `resolve_for(model_config)` fills it in when the
    config meets one (convert does), and a converted model keeps and saves the resolved config."""

    mode: str = field(default="lf", metadata={"help": f"Routing mode, one of {MODES}."})
    split_layer: int | None = field(
        default=18, metadata={"help": "s: first deep layer; layers [0, s) are shared by all tokens (7B: 18)."}
    )
    fusion_layers: int = field(
        default=1, metadata={"help": "K (lf only): last K layers fuse image and text; 0 = DPVR-LF-ideal."}
    )
    fusion_at: tuple[int, ...] = field(
        default=(),
        metadata={"help": "lf: fuse at these deep layers instead of the last K (sparse fusion); fusion_layers "
                  "becomes their count. Each run of consecutive layers starts from the side-branch image states."},
    )
    side_depth: int = field(default=1, metadata={"help": "D: decoder layers in the side branch (pc/kv/lf)."})
    side_init: str = field(
        default="copy", metadata={"help": "'copy': deep copies of layers s..s+D-1; 'random': fresh init."}
    )
    freeze: str = field(
        default="all_but_side_branch",
        metadata={"help": "'all_but_side_branch' (the paper's recipe) or 'none' (train everything)."},
    )
    fastv_layer: int = field(default=2, metadata={"help": "fastv: rank image tokens with layer K's attention."})
    fastv_ratio: float = field(default=0.5, metadata={"help": "fastv: share of image tokens dropped, in [0, 1]."})
    shallow_fastv: bool = field(
        default=False,
        metadata={"help": "lf/pc/kv/vtw: also prune image tokens FastV-style (fastv_layer, fastv_ratio) inside "
                  "the shared layers [0, s); the side branch and fusion then see the kept tokens only."},
    )
    check_finite: bool = field(
        default=True, metadata={"help": "Raise, naming the layer, when a layer produces NaN/inf (one sync per forward)."}
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DPVRError(f"DPVRConfig.mode={self.mode!r} is not one of {MODES}")
        for name in ("split_layer", "fusion_layers", "side_depth", "fastv_layer"):
            value = getattr(self, name)
            if value is None and name == "split_layer":  # derived from the model by resolve_for
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DPVRError(f"DPVRConfig.{name}={value!r} must be a non-negative int")
        ratio = self.fastv_ratio
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
            raise DPVRError(f"DPVRConfig.fastv_ratio={ratio!r} must be a number in [0, 1]")
        object.__setattr__(self, "fastv_ratio", float(ratio))
        for name in ("shallow_fastv", "check_finite"):
            if not isinstance(getattr(self, name), bool):
                raise DPVRError(f"DPVRConfig.{name}={getattr(self, name)!r} must be True or False")
        self._normalise_fusion_at()
        if self.mode in SPLIT_MODES and self.split_layer is not None and self.split_layer < 1:
            raise DPVRError(f"DPVRConfig.split_layer={self.split_layer} must be >= 1 for mode {self.mode!r}")
        if self.mode in SIDE_BRANCH_MODES and self.side_depth < 1:
            raise DPVRError(f"DPVRConfig.side_depth={self.side_depth} must be >= 1 for mode {self.mode!r}")
        if self.side_init not in ("copy", "random"):
            raise DPVRError(f"DPVRConfig.side_init={self.side_init!r} must be 'copy' or 'random'")
        if self.freeze not in ("all_but_side_branch", "none"):
            raise DPVRError(f"DPVRConfig.freeze={self.freeze!r} must be 'all_but_side_branch' or 'none'")
        if not 0.0 <= float(self.fastv_ratio) <= 1.0:
            raise DPVRError(f"DPVRConfig.fastv_ratio={self.fastv_ratio!r} must be in [0, 1]")

    def _normalise_fusion_at(self) -> None:
        value = self.fusion_at
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise DPVRError(f"DPVRConfig.fusion_at={value!r} must be a sequence of layer indices")
        layers = tuple(value)
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
            raise DPVRError(f"DPVRConfig.fusion_at={value!r} must hold non-negative ints")
        if len(set(layers)) != len(layers):
            raise DPVRError(f"DPVRConfig.fusion_at={value!r} names a layer twice")
        if layers and self.mode != "lf":
            raise DPVRError(f"DPVRConfig.fusion_at applies to mode 'lf', not {self.mode!r}")
        # fusion_layers is then their count, whatever it was (a replace() that sets fusion_at on a
        # last-K config, or the reverse, must not trip over the other field)
        object.__setattr__(self, "fusion_at", tuple(sorted(layers)))
        if layers:
            object.__setattr__(self, "fusion_layers", len(layers))

    @property
    def has_side_branch(self) -> bool:
        return self.mode in SIDE_BRANCH_MODES

    @property
    def is_lf_ideal(self) -> bool:
        return self.mode == "lf" and self.fusion_layers == 0

    def resolve_for(self, model_config) -> "DPVRConfig":
        """This config for the model `model_config` describes (a routed family's config, stock or DPVR):
        its model-dependent defaults filled in, then its depth-dependent ranges checked. The one place a
        split that was not given is chosen, as PEFT's `_prepare_adapter_config` fills an adapter's target
        modules from the model: a DPVR checkpoint's own split, else DEFAULT_SPLIT_RATIO of the depth."""
        num_layers = model_config.text_config.num_hidden_layers
        cfg = self
        if cfg.split_layer is None:
            own = getattr(model_config, "dpvr", None)  # a DPVR model's routing (dpvr.routing.classes)
            split = own.split_layer if isinstance(own, DPVRConfig) else default_split(num_layers)
            cfg = dataclasses.replace(cfg, split_layer=split)
        cfg.validate_for(num_layers)
        return cfg

    def validate_for(self, num_layers: int) -> None:
        """Check the ranges that depend on the language model's depth L."""
        L, s, K, D = num_layers, self.split_layer, self.fusion_layers, self.side_depth
        if s is None:  # a schedule needs a split: convert() resolves it, a hand-built config must too
            raise DPVRError("DPVRConfig.split_layer=None is derived from the model: use cfg.resolve_for(model.config)")
        if self.mode in SPLIT_MODES and not 1 <= s < L:
            raise DPVRError(f"DPVRConfig.split_layer={s} out of range: need 1 <= split_layer < {L} (model has {L} layers)")
        if self.mode == "lf" and not 0 <= K <= L - s:
            raise DPVRError(
                f"DPVRConfig.fusion_layers={K} out of range: need 0 <= fusion_layers <= {L - s} "
                f"(= layers - split_layer) so fusion starts at or after the split"
            )
        outside = [i for i in self.fusion_at if not s <= i < L]
        if outside:
            raise DPVRError(f"DPVRConfig.fusion_at={self.fusion_at} out of range: layers {outside} are not deep "
                            f"layers (need split_layer={s} <= layer < {L})")  # fmt: skip
        if self.has_side_branch and self.side_init == "copy" and s + D > L:
            raise DPVRError(
                f"DPVRConfig.side_depth={D} out of range: side_init='copy' copies layers {s}..{s + D - 1} "
                f"but the model has {L} layers; use side_depth <= {L - s} or side_init='random'"
            )
        if self.shallow_fastv and self.mode not in SPLIT_MODES:
            raise DPVRError(f"DPVRConfig.shallow_fastv applies to modes pc/kv/lf/vtw, not {self.mode!r}")
        if self.shallow_fastv and self.has_side_branch and self.fastv_ratio >= 1.0:
            raise DPVRError(f"DPVRConfig.fastv_ratio={self.fastv_ratio} with shallow_fastv drops every image token "
                            f"before the side branch of mode {self.mode!r}: use fastv_ratio < 1, or mode 'vtw'")  # fmt: skip
        if self.shallow_fastv and not self.fastv_layer < s:
            raise DPVRError(f"DPVRConfig.fastv_layer={self.fastv_layer} out of range for shallow_fastv: need < split_layer={s}")
        if self.mode == "fastv" and not self.fastv_layer < L - 1:
            raise DPVRError(f"DPVRConfig.fastv_layer={self.fastv_layer} out of range: need fastv_layer < {L - 1}")

    def with_routing(self, **overrides: Any) -> "DPVRConfig":
        """This config with other routing fields, as `model.routing(...)` runs it. A sparse placement
        (`fusion_at`) does not carry over to another mode or to an explicit `fusion_layers`, nor
        `shallow_fastv` to vanilla or fastv."""
        merged = {**self.to_dict(), **overrides}
        if "fusion_at" not in overrides and (merged["mode"] != "lf" or "fusion_layers" in overrides):
            merged["fusion_at"] = ()
        # nor does FastV inside the shared layers to a mode without them: vanilla is the stock forward
        if "shallow_fastv" not in overrides and merged["mode"] not in SPLIT_MODES:
            merged["shallow_fastv"] = False
        return DPVRConfig.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DPVRConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DPVRError(f"unknown DPVRConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_namespace(cls, ns: Any, **overrides: Any) -> "DPVRConfig":
        """The routing a parsed command line gives (argparse's Namespace from `add_routing_arguments`, or a
        dataclass of flags such as `dpvr train`'s): each DPVRConfig field it has, then `overrides`; the
        others keep their defaults. A derived flag left unset (split_layer=None) stays None for resolve_for."""
        given = {name: getattr(ns, name) for name in _FIELDS if hasattr(ns, name)}
        return cls.from_dict({**given, **overrides})

    def to_argv(self, names: Iterable[str] | None = None) -> list[str]:
        """The routing flags that give this config back through `add_routing_arguments` and `from_namespace`:
        the fields `names`, by default the mode, the split and each other flag whose value is not its
        default (split_layer is derived per command when absent, so it is always said)."""
        if names is None:
            names = [n for n in ROUTING_FLAGS if n in ("mode", "split_layer") or getattr(self, n) != _FIELDS[n].default]
        argv: list[str] = []
        for name in names:
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            if value is None:  # an unresolved split: the command derives it as this config would
                continue
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, tuple):
                argv += [flag, ",".join(map(str, value))]
            else:
                argv += [flag, str(value)]
        return argv


# ----------------------------------------------------------------------------- command-line flags
# The routing fields a command line sets, in this order; flags, types, defaults and help come from
# the fields themselves, so a default is written once (above).
ROUTING_FLAGS = ("mode", "split_layer", "fusion_layers", "fusion_at", "side_depth", "fastv_layer", "fastv_ratio",
                 "shallow_fastv")  # fmt: skip
# the routing fields `dpvr train` takes as flags (dpvr.train.args builds them from the fields, as above)
TRAIN_FLAGS = ("mode", "split_layer", "fusion_layers", "fusion_at", "side_depth", "side_init")
_FIELDS = {f.name: f for f in dataclasses.fields(DPVRConfig)}
ROUTING_FIELDS = tuple(_FIELDS)  # every DPVRConfig field, flag or not


# what a command does when a routing flag it derives is not given
_DERIVED = {"mode": "the checkpoint's own routing; a stock model stays stock",
            "split_layer": "the checkpoint's own; a stock model: 18/32 of its depth"}  # fmt: skip


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def add_routing_arguments(group, names: tuple[str, ...] = ROUTING_FLAGS, **defaults: Any) -> None:
    """--split-layer, --fusion-layers, ... for the DPVRConfig fields `names` on an argparse group.
    `defaults` replaces a field's default where the command derives it (split_layer=None: from the
    model's depth; mode=None: no routing)."""
    for name in names:
        f, default = _FIELDS[name], defaults.get(name, _FIELDS[name].default)
        flag, help_text = "--" + name.replace("_", "-"), f.metadata["help"]
        if name in defaults:
            help_text += f" (default: {_DERIVED.get(name, 'derived') if default is None else default})"
        if isinstance(f.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(f.default, tuple):
            group.add_argument(flag, type=_layer_list, default=default, help=help_text + " Comma-separated.")
        elif name == "mode":
            group.add_argument(flag, default=default, choices=MODES, help=help_text)
        else:
            group.add_argument(flag, type=type(f.default), default=default, help=help_text)


# the paper's 7B split (18 of 32 layers) as a ratio, for models of other depths
DEFAULT_SPLIT_RATIO = 18 / 32


def default_split(num_layers: int) -> int:
    return max(1, min(num_layers - 1, round(DEFAULT_SPLIT_RATIO * num_layers)))


def routing_default(name: str) -> Any:
    """The DPVRConfig default of field `name` (for signatures and dataclasses outside argparse)."""
    return _FIELDS[name].default


def routing_help(name: str) -> str:
    """The DPVRConfig help of field `name` (the flag generators outside argparse)."""
    return _FIELDS[name].metadata["help"]
