"""The side branch's container: the layers of a ModuleList (same state-dict keys `side_branch.0...`),
but not a ModuleList, because PEFT refuses to wrap one: with this, `modules_to_save=["side_branch"]`
works, and `active_side_branch` finds the copy PEFT trains.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from dpvr.config import DPVRConfig


class SideBranch(nn.Module):
    """D decoder layers run in turn on the image tokens (indexable and iterable like a ModuleList)."""

    def __init__(self, layers: Iterable[nn.Module]):
        super().__init__()
        for j, layer in enumerate(layers):
            self.add_module(str(j), layer)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __getitem__(self, j: int) -> nn.Module:
        return list(self._modules.values())[j]


def active_side_branch(side: nn.Module | None) -> SideBranch | None:
    """The side branch the forward runs: itself, or, when PEFT's modules_to_save wrapped it, the trained
    copy of the active adapter (the original while adapters are disabled). The wrapper is never called
    as a module (routing reads the layers' parts), so its own forward-time switch never happens."""
    if side is None or not hasattr(side, "modules_to_save") or not hasattr(side, "original_module"):
        return side
    if side.disable_adapters or not side.active_adapters:
        return side.original_module
    return side.modules_to_save[side.active_adapters[0]]


def build_side_branch(base, config: DPVRConfig) -> SideBranch | None:
    """The side branch a `convert` of the stock LLaVA `base` gets: copies of layers s..s+D-1
    (`side_init="copy"`) or freshly initialised layers of the same class; None for modes without one."""
    if not config.has_side_branch:
        return None
    layers = base.model.language_model.layers
    s, D = config.split_layer, config.side_depth
    if config.side_init == "copy":
        return SideBranch(copy.deepcopy(layers[s + j]) for j in range(D))
    ref = next(layers[0].parameters())
    with torch.device(ref.device):
        side = SideBranch(type(layers[0])(base.config.text_config, s + j) for j in range(D))
    side.apply(base._init_weights)
    return side.to(ref.dtype)
