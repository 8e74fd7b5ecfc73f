"""Token sets: which positions of the sequence a layer runs on, gathered into a dense block.

Routing runs different layers on different subsets of the sequence (all tokens, text only, image
only, the tokens FastV keeps). Rows of a batch select different numbers of positions, so a set is
stored as a permutation prefix: `idx[b, :n]` are row b's selected positions in sequence order,
followed by unselected positions (distinct, so scattering back is deterministic) flagged invalid.

The sequence index itself is the causal order: key j is visible to query i iff order_j <= order_i.
Position ids (for rotary embeddings) are carried separately, so left padding and routing never
change which rotary angle a token gets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenSet:
    idx: torch.Tensor  # (B, N) long: sequence positions, selected ones first, in order
    valid: torch.Tensor  # (B, N) bool: False on filler entries
    identity: bool = False  # idx == arange(T) for every row and all valid: gather/scatter are no-ops
    dense: bool = False  # every entry valid (no filler): plain causal attention needs no explicit mask
    name: str = "tokens"  # what the set is ("all", "text", "image", "kept"): names the routed loop's stages

    @staticmethod
    def from_mask(select: torch.Tensor, name: str = "tokens") -> "TokenSet":
        """select (B, T) bool -> the set of selected positions, width = the largest row count."""
        B, T = select.shape
        if bool(select.all()):
            idx = torch.arange(T, device=select.device).expand(B, T)
            return TokenSet(idx, torch.ones_like(select), identity=True, dense=True, name=name)
        # stable sort puts selected positions first, keeping their order
        order = torch.sort((~select).to(torch.int8), dim=1, stable=True).indices  # (B, T)
        width = int(select.sum(1).max())
        idx = order[:, :width]
        valid = select.gather(1, idx)
        return TokenSet(idx, valid, dense=bool(valid.all()), name=name)

    @property
    def width(self) -> int:
        return self.idx.shape[1]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, ...) -> (B, N, ...)."""
        if self.identity:
            return x
        index = self.idx.view(*self.idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, index)

    def scatter(self, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """Write part (B, N, ...) back into full (B, T, ...) at valid entries; returns a new tensor."""
        if self.identity:
            return part
        keep = self.valid.view(*self.valid.shape, *([1] * (part.dim() - 2)))
        part = torch.where(keep, part, self.gather(full))  # filler entries write back what was there
        index = self.idx.view(*self.idx.shape, *([1] * (full.dim() - 2))).expand(-1, -1, *full.shape[2:])
        return full.scatter(1, index, part)


def attention_bias(
    q_order: torch.Tensor,  # (B, Nq) long
    q_valid: torch.Tensor,  # (B, Nq) bool
    k_order: torch.Tensor,  # (B, Nk) long
    k_valid: torch.Tensor,  # (B, Nk) bool
    dtype: torch.dtype,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Additive attention bias (B, 1, Nq, Nk): 0 where query i may see key j, dtype-min elsewhere.

    Causal by sequence order, keys restricted to valid ones. Filler query rows see every key so that
    no row is fully masked (sdpa returns NaN for those); their outputs are never scattered back.
    """
    allowed = k_valid[:, None, :] & (k_order[:, None, :] <= q_order[:, :, None])  # (B, Nq, Nk)
    if sliding_window is not None:
        allowed &= (q_order[:, :, None] - k_order[:, None, :]) < sliding_window
    allowed |= ~q_valid[:, :, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]
