"""RoutedCache: a KV cache whose layers hold different token sets.

After a routed prefill, layer i's cache holds exactly the keys/values that layer attended over:
every token in the shared layers, text only in LF's text-only layers (and VTW's), side-branch image
states plus text in LF's fusion layers and in PC/KV's deep layers, FastV's kept tokens after its
pruning layer. Each entry keeps the keys' sequence order and validity, so decoding needs no mask
bookkeeping outside the cache. Generated tokens are text: every layer appends them.

It speaks the small part of the Cache protocol `generate` uses: `get_seq_length` (positions seen,
used to slice new input ids), `reorder_cache` (beam search) and `is_compileable`.
"""
from __future__ import annotations

import torch

from dpvr.config import DPVRConfig
from dpvr.errors import DPVRError
from dpvr.routing.layer import KV


NO_ROLLBACK = ("RoutedCache cannot roll back rejected draft tokens: assisted/speculative decoding and "
               "prompt_lookup_num_tokens are not supported in routed modes; drop them, or generate inside "
               "model.routing(mode='vanilla')")


class RoutedCache:
    is_compileable = False

    def __init__(self, num_layers: int, routing: DPVRConfig | dict):
        self.layers: list[KV | None] = [None] * num_layers
        # the DPVRConfig it was filled under; a model with another refuses it. Compared as normalised
        # objects, so a config that went through JSON (lists for tuples) is still the same routing.
        self.routing = _as_config(routing)
        self.seen = 0  # sequence positions consumed (prompt + generated), padding included
        self.dense = True  # no padding anywhere: decode attention needs no mask
        # Qwen2-VL's multimodal rope: per row, next rope position minus tokens seen (B, 1); None for 1-D
        self.rope_deltas: torch.Tensor | None = None

    # --------------------------------------------------------------- filling
    def fill(self, layer_kv: dict[int, KV], seq_len: int, dense: bool, rope_deltas: torch.Tensor | None = None) -> None:
        """Store a prefill's per-layer keys/values (what each layer attended over, in key order)."""
        missing = [i for i in range(len(self.layers)) if i not in layer_kv]
        assert not missing, f"prefill produced no keys/values for layers {missing}"
        for i, kv in layer_kv.items():
            self.update(i, kv)
        self.seen, self.dense, self.rope_deltas = seq_len, dense, rope_deltas

    def update(self, i: int, keys: KV) -> None:
        """Set layer i's keys/values: all it has attended over so far, oldest first (past, then new)."""
        self.layers[i] = keys

    def newest_finite(self, i: int, n: int) -> bool:
        """Whether the keys/values layer i appended for the last n tokens are finite (valid rows)."""
        kv, valid = self.layers[i], self.layers[i].valid[:, -n:]
        mask = valid[:, None, :, None]
        return all(bool(torch.where(mask, t[:, :, -n:], 0).isfinite().all()) for t in (kv.key, kv.value))

    # --------------------------------------------------------------- generate() protocol
    @property
    def is_linear(self) -> list[bool]:
        # transformers 5.24's generate() asks which layers hold linear-attention states: none here
        return [False] * len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for i, kv in enumerate(self.layers):
            if kv is not None:
                idx = beam_idx.to(kv.key.device)
                self.layers[i] = KV(kv.key[idx], kv.value[idx], kv.order[idx], kv.valid[idx])
        if self.rope_deltas is not None:
            self.rope_deltas = self.rope_deltas[beam_idx.to(self.rope_deltas.device)]

    def crop(self, max_length: int) -> None:
        raise DPVRError(NO_ROLLBACK)

    def activate_past_recording(self) -> None:  # the first thing assisted decoding asks of a cache
        raise DPVRError(NO_ROLLBACK)

    # --------------------------------------------------------------- checks and figures
    def check_compatible(self, routing: DPVRConfig | dict, batch: int) -> None:
        # the model's own config object is the one generate() filled the cache under: no field compare
        # (under torch.compile with dynamic shapes, a dataclass compare of two guarded objects whose int
        # fields dynamo made symbolic cannot be decided at trace time)
        if routing is not self.routing:
            self._check_routing(_as_config(routing))
        first = self.layers[0]
        if first is not None and first.key.shape[0] != batch:
            raise DPVRError(f"RoutedCache holds batch {first.key.shape[0]} but the input has batch {batch}")

    @torch.compiler.disable
    def _check_routing(self, routing: DPVRConfig) -> None:
        if routing != self.routing:
            raise DPVRError(f"this RoutedCache was filled under routing {self.routing}, not {routing}")

    def nbytes(self) -> int:
        """Bytes held by keys and values (order/valid bookkeeping excluded)."""
        return sum(kv.key.nbytes + kv.value.nbytes for kv in self.layers if kv is not None)

    def lengths(self) -> list[int]:
        """Stored key count per layer (rows padded to the widest)."""
        return [0 if kv is None else kv.key.shape[2] for kv in self.layers]



def _as_config(routing: DPVRConfig | dict) -> DPVRConfig:
    return routing if isinstance(routing, DPVRConfig) else DPVRConfig.from_dict(routing)
