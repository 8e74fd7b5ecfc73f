"""The routed decoder loop: runs a mode's schedule (`dpvr.routing.schedule`) step by step.

Input is the merged embedding sequence (text embeddings with projected image features scattered in)
and output the final-norm hidden states (B, T, D), exactly where the stock `LlamaModel` would hand
them to `lm_head`. Which positions each layer runs on is the schedule's: a step is the side branch,
a run of layers on one token set (all, text, image; "kept" after FastV pruning), a run of text-query
layers over fixed image keys/values, or FastV's ranking layer. `routed_decode` runs new tokens
against a RoutedCache, whose per-layer contents the prefill's schedule decided.

Text-only batches (no image token anywhere) run every layer on every token in every mode, which is
the stock computation. Only text positions' outputs are part of the contract; image positions hold
whatever their last layer left there.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpvr.config import DPVRConfig
from dpvr.errors import DPVRError, NonFiniteError
from dpvr.routing.cache import RoutedCache
from dpvr.routing.layer import KV, project_kv, routed_layer
from dpvr.routing.schedule import ALL, IMAGE, TEXT, Span, compile_schedule, split_schedule
from dpvr.routing.tokens import TokenSet


@dataclass
class RoutedOutput:
    hidden: torch.Tensor  # (B, T, D) after the final norm
    all_hidden: tuple[torch.Tensor, ...] | None  # embeddings + one (B, T, D) per layer, the last after the norm (as stock)
    kept: torch.Tensor  # (B, T) bool: valid positions left after any FastV pruning
    layer_kv: dict[int, KV] = field(default_factory=dict)  # per layer: what it attended over


# Observers of the schedule's stages (a run of layers on one token set, the side branch, a text-query
# layer): each is entered around every stage as hook(name, layers) and may time it or count its FLOPs
# (`dpvr breakdown` does both). Stages are also labelled for torch.profiler traces.
STAGE_HOOKS: list[Callable[[str, Span | None], ContextManager]] = []


@contextlib.contextmanager
def observe_stages(hook: Callable[[str, Span | None], ContextManager]):
    """Enter hook(name, layers) around every stage of the routed forwards run inside this block."""
    STAGE_HOOKS.append(hook)
    try:
        yield
    finally:
        STAGE_HOOKS.remove(hook)


@contextlib.contextmanager
def _stage(name: str, layers: Span | None = None):
    with torch.profiler.record_function(f"dpvr: {name}"), contextlib.ExitStack() as stack:
        for hook in STAGE_HOOKS:  # usually none: the label is all a stage costs (~10 us)
            stack.enter_context(hook(name, layers))
        yield


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    """0-dim bool: no NaN/inf in x. A sum is non-finite iff an element is (inf - inf is NaN), and on CPU
    it is ~50x cheaper than `isfinite().all()` (0.03 vs 1.4 ms on a (1, 608, 512) fp32 tensor, one
    thread), which made the per-layer check ~3% of a one-thread CPU prefill. Accumulating in fp32
    keeps sums of large fp16 values from overflowing into a false alarm."""
    return torch.sum(x, dtype=torch.float32).isfinite()


class _Loop:
    """State shared by one forward: rotary tables, finiteness flags, collected outputs."""

    def __init__(self, lm: nn.Module, cfg: DPVRConfig, h, pos, checkpointing: bool, keep_hidden: bool, keep_kv: bool):
        self.lm, self.cfg = lm, cfg
        self.cos, self.sin = lm.rotary_emb(h, pos)  # (B, T, hd) each (Qwen's mrope axes folded in)
        self.checkpointing = checkpointing
        self.flags: list[tuple[str, torch.Tensor]] = []
        self.hidden: list[torch.Tensor] | None = [h] if keep_hidden else None
        self.keep_kv = keep_kv
        self.layer_kv: dict[int, KV] = {}

    def run(self, name, layer, hs, order, valid, cos, sin, extra=None, probe=None, dense=False):
        if self.checkpointing and torch.is_grad_enabled():
            out, keys, probs = checkpoint(
                routed_layer, layer, hs, order, valid, cos, sin, extra, probe, dense, self.keep_kv, use_reentrant=False
            )
        else:
            out, keys, probs = routed_layer(layer, hs, order, valid, cos, sin, extra, probe, dense, self.keep_kv)
        if self.cfg.check_finite:  # flag only; one sync at the end of the forward
            checked = out if dense else torch.where(valid[..., None], out, 0)  # filler rows may hold anything
            self.flags.append((name, _all_finite(checked)))
        return out, keys, probs

    def layers(self, idx: Span, S: TokenSet, h: torch.Tensor, extra: Callable[[int], KV] | None = None, probe=None):
        """Text layers idx, in turn, on set S of the full states h (B, T, D). The set is gathered once and
        scattered back once, however many layers run on it (LF's 13 text-only layers at 7B): per-layer
        gather/scatter of the full sequence was measurable next to a 64-token layer on CPU. extra(i):
        layer i's key/value-only tokens. Returns the new full states and the last layer's probe probabilities."""
        if not idx:
            return h, None
        with _stage(f"{idx} on {S.name} ({S.width} tokens)", idx):
            hs, cos, sin = S.gather(h), S.gather(self.cos), S.gather(self.sin)  # (B, N, D), (B, N, hd) x 2
            # prefill extras (DPVR-KV's image keys) may sit after some queries: never mask-free then
            dense = S.dense and extra is None
            probs = None
            for i in idx:
                kv = extra(i) if extra is not None else None
                hs, keys, probs = self.run(f"layer {i}", self.lm.layers[i], hs, S.idx, S.valid, cos, sin, kv, probe, dense)
                if self.keep_kv:  # the joined keys the layer attended over: DPVR-KV's separate image keys are freed
                    self.layer_kv[i] = keys
                # (without a cache, keys is None: routed_layer freed them before its MLP, as the stock layer does)
                if self.hidden is not None:
                    self.hidden.append(S.scatter(h, hs))
            # with hidden states kept, the last layer's full states were just scattered: reuse them
            return (self.hidden[-1] if self.hidden is not None else S.scatter(h, hs)), probs

    def text_queries(self, idx: Span, TXT: TokenSet, IMG: TokenSet, h: torch.Tensor) -> torch.Tensor:
        """Layers idx with text queries only: the image states of h, fixed, give keys/values (norm, k/v
        projection, rotary) and nothing else, no query, o_proj or MLP; h's image positions are left as
        they are. DPVR-KV's deep layers, and the last layer of an LF fusion run, whose image outputs
        nothing would read."""
        name = f"{idx}: {TXT.name} queries, {IMG.name} keys/values ({TXT.width} + {IMG.width} tokens)"
        with _stage(name, idx):
            img, cos, sin = IMG.gather(h), IMG.gather(self.cos), IMG.gather(self.sin)

            def image_kv(i: int) -> KV:
                return KV(*project_kv(self.lm.layers[i], img, cos, sin), IMG.idx, IMG.valid)

            return self.layers(idx, TXT, h, extra=image_kv)[0]

    def fastv_prune(self, f: int, sets: "_Sets", h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer f on every token, probing the last valid token's attention: (new h, the valid mask
        keeping text + the image tokens it attends to most)."""
        S, valid = sets[ALL], sets.valid
        last = (valid.long() * torch.arange(valid.shape[1], device=valid.device)).argmax(1)  # (B,) last valid position
        h, probs = self.layers(Span(f, f + 1), S, h, probe=_row_in(S, last))
        return h, fastv_keep(probs, S, sets.is_img, valid, self.cfg.fastv_ratio)

    def side(self, side_branch: nn.ModuleList, IMG: TokenSet, h: torch.Tensor) -> torch.Tensor:
        """Side branch on the image positions of h: returns (B, N_img, D)."""
        with _stage(f"side branch on {IMG.name} ({IMG.width} tokens)"):
            hs, cos, sin = IMG.gather(h), IMG.gather(self.cos), IMG.gather(self.sin)
            for j, layer in enumerate(side_branch):
                hs = self.run(f"side_branch.{j}", layer, hs, IMG.idx, IMG.valid, cos, sin, dense=IMG.dense)[0]
            return hs

    def raise_if_not_finite(self) -> None:
        if not self.flags:
            return
        ok = torch.stack([f for _, f in self.flags]).cpu()
        if not bool(ok.all()):
            name = self.flags[int((~ok).nonzero()[0])][0]
            raise NonFiniteError(f"{name} produced NaN/inf (e.g. fp16 overflow); earlier layers were finite")


def fastv_keep(probs: torch.Tensor, S: TokenSet, is_img: torch.Tensor, valid: torch.Tensor, ratio: float):
    """Keep mask (B, T): text + the image tokens with the most attention from the probed (last) token.

    probs (B, H, N) are over the keys of set S; each row drops int(ratio * its image count) tokens.
    """
    B, T = is_img.shape
    score = torch.zeros(B, T, dtype=probs.dtype, device=probs.device)
    score = S.scatter(score, probs.mean(1))  # head-mean attention, back in sequence positions
    score = score.masked_fill(~(is_img & valid), float("-inf"))
    n_img = (is_img & valid).sum(1)  # (B,)
    n_keep = n_img - (n_img.float() * ratio).long()
    rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # rank of each position
    kept_img = rank < n_keep[:, None]
    return valid & (~is_img | kept_img)


class _Sets:
    """The token sets of one forward under the current valid mask, each built on first use."""

    def __init__(self, valid: torch.Tensor, is_img: torch.Tensor, pruned: bool = False):
        self.valid, self.is_img, self.pruned = valid, is_img, pruned
        self._built: dict[str, TokenSet] = {}

    def __getitem__(self, name: str) -> TokenSet:
        if name not in self._built:
            select = {ALL: self.valid, TEXT: self.valid & ~self.is_img, IMAGE: self.valid & self.is_img}[name]
            label = "kept" if name == ALL and self.pruned else name  # FastV's survivors
            self._built[name] = TokenSet.from_mask(select, label)
        return self._built[name]


def routed_decoder(
    lm: nn.Module,  # the LlamaModel-like language model (layers, norm, rotary_emb)
    side_branch: nn.ModuleList | None,
    cfg: DPVRConfig,
    h: torch.Tensor,  # (B, T, D) merged input embeddings
    is_img: torch.Tensor,  # (B, T) bool
    valid: torch.Tensor,  # (B, T) bool (attention mask)
    pos: torch.Tensor,  # (B, T) position ids
    checkpointing: bool = False,
    keep_hidden: bool = False,
    keep_kv: bool = False,
    shared: bool = False,
) -> RoutedOutput:
    """Runs the steps `compile_schedule` gives for cfg, in order (see dpvr.routing.schedule). With
    `shared`, h holds the states after the shared stack (`shared_stack`), whose steps are skipped."""
    if shared and (keep_hidden or keep_kv):
        raise DPVRError("states given after the shared stack: no hidden states or cache of its layers to return")
    loop = _Loop(lm, cfg, h, pos, checkpointing, keep_hidden, keep_kv)
    has_images = bool((is_img & valid).any())
    steps = split_schedule(cfg, len(lm.layers), has_images)[1] if shared else compile_schedule(cfg, len(lm.layers), has_images)
    sets, side = _Sets(valid, is_img), None
    for step in steps:
        if step.side:
            side = loop.side(side_branch, sets[IMAGE], h)
            continue
        if step.image_from_side:
            h = sets[IMAGE].scatter(h, side)
        if step.prune:
            h, kept = loop.fastv_prune(step.layers.start, sets, h)
            sets = _Sets(kept, is_img, pruned=True)  # tokens FastV dropped are gone for good
        elif step.image_kv:
            h = loop.text_queries(step.layers, sets[TEXT], sets[IMAGE], h)
        else:
            h, _ = loop.layers(step.layers, sets[step.queries], h)
    loop.raise_if_not_finite()
    hidden = lm.norm(h)
    return RoutedOutput(
        hidden=hidden,
        all_hidden=(*loop.hidden[:-1], hidden) if loop.hidden is not None else None,  # stock: last one normed
        kept=sets.valid,
        layer_kv=loop.layer_kv,
    )


def shared_stack(lm: nn.Module, cfg: DPVRConfig, h, is_img, valid, pos, start: int = 0, text_path: bool = True) -> torch.Tensor:
    """(B, T, D) states after the frozen part of the schedule (`split_schedule`) on the merged embeddings
    h, where `routed_decoder(..., shared=True)` goes on from: the shared stack [0, split), then the
    text path up to the first step that reads the side branch (text positions only). text_path=False:
    the shared stack alone (every position after the split: what a deeper split goes on from). start > 0:
    h is the states after layers [0, start) of the shared stack, and only the layers from there run."""
    loop = _Loop(lm, cfg, h, pos, checkpointing=False, keep_hidden=False, keep_kv=False)
    sets = _Sets(valid, is_img)
    frozen = split_schedule(cfg, len(lm.layers), has_images=bool((is_img & valid).any()))[0]
    for step in frozen if text_path else frozen[:1]:
        h, _ = loop.layers(Span(max(start, step.layers.start), step.layers.stop), sets[step.queries], h)
    loop.raise_if_not_finite()
    return h


def routed_decode(
    lm: nn.Module,
    cfg: DPVRConfig,
    cache: RoutedCache,
    h: torch.Tensor,  # (B, n, D) embeddings of the new (text) tokens
    valid: torch.Tensor,  # (B, n) bool
    pos: torch.Tensor,  # (B, n) position ids
    hidden_out: list | None = None,  # filled as output_hidden_states: embeddings, each layer's, the last normed
) -> torch.Tensor:
    """New tokens through every layer against that layer's cached token set; appends their keys/values.

    Generated tokens are text, and text runs through every layer in every mode, so one loop serves
    all modes: the routing lives in what each layer's cache holds."""
    n = h.shape[1]
    order = (cache.seen + torch.arange(n, device=h.device)).expand_as(valid)  # (B, n) sequence index
    cos, sin = lm.rotary_emb(h, pos)
    dense = cache.dense and bool(valid.all())
    for i, layer in enumerate(lm.layers):
        if hidden_out is not None:
            hidden_out.append(h)
        h, keys, _ = routed_layer(layer, h, order, valid, cos, sin, cache.layers[i], dense=dense)
        cache.update(i, keys)  # past + new, already joined for the attention: no second concatenation
    cache.seen += n
    cache.dense = dense
    # Decoding is launch-bound: instead of a check per layer, one on the output, and on failure the
    # culprit is found from the cache (layer i's bad output poisons the keys layer i + 1 appended).
    if cfg.check_finite and not bool(_all_finite(torch.where(valid[..., None], h, 0))):
        bad = next((i - 1 for i in range(len(lm.layers)) if not cache.newest_finite(i, n)), len(lm.layers) - 1)
        where = "the input embeddings" if bad < 0 else f"layer {bad}"
        raise NonFiniteError(f"{where} produced NaN/inf while decoding (e.g. fp16 overflow)")
    h = lm.norm(h)
    if hidden_out is not None:
        hidden_out.append(h)
    return h


def _row_in(S: TokenSet, positions: torch.Tensor) -> torch.Tensor:
    """Row index within set S of each batch row's sequence position (B,) -> (B,)."""
    return (S.idx == positions[:, None]).float().argmax(1)
