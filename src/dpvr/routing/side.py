"""The side branch's container: the layers of a ModuleList (same state-dict keys `side_branch.0...`),
but not a ModuleList, because PEFT refuses to wrap one: with this, `modules_to_save=["side_branch"]`
works, and `active_side_branch` finds the copy PEFT trains.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn


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
