"""One schedule per mode: the list of steps a routed forward runs, compiled from (DPVRConfig, L).

Everything that needs to know what a mode does derives it from this list: the executor
(`dpvr.routing.forward`), the analytic FLOP model (`dpvr.bench.flops`), what the routed cache holds
per layer (`layer_contents`) and the one-line plan (`summary`). Adding a mode is one compile function
here, its trait row in `dpvr.config.MODE_TRAITS`, its naive reference in tests/reference.py, its tests.

A step is either the side branch (run on the image positions alone) or a run of consecutive decoder
layers on one token set; a run is gathered once and scattered back once, however many layers it has.

    mode     layers [0, s)   side branch    deep layers [s, L)
    lf       all tokens      image only     text only, except at the fusion layers (the last K, or
                                            `fusion_at`): each run of consecutive fusion layers starts
                                            with the image positions reset to the side output, runs on
                                            all tokens, and its last layer has image keys/values only
    pc       all tokens      image only     all, image reset to the side output before each layer
    kv       all tokens      image only     text queries; image = side output, keys/values only
    vtw      all tokens      -              text only
    fastv    all tokens up to fastv_layer, then text + the image tokens the last token attends to most
    (lf/pc/kv/vtw with shallow_fastv: FastV pruning inside [0, s) first; dropped tokens stay dropped)

Why a fusion run's last layer has image keys/values only: its image outputs would reach nothing
(text-only layers do not read them, the next fusion run resets them, logits read text positions),
so the text outputs are exact for less work (no image query, o_proj or MLP).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dpvr.config import MODE_TRAITS, DPVRConfig
from dpvr.errors import DPVRError

ALL, TEXT, IMAGE = "all", "text", "image"


@dataclass(frozen=True)
class Span:
    """Layers start..stop-1, iterated like range(start, stop). Not a range because torch.compile
    cannot carry a range across the routed loop's graph breaks (a resumed frame rebuilds it from
    symbolic ints and fails); a dataclass of two ints it guards like any attribute."""

    start: int
    stop: int

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __str__(self) -> str:
        return f"layer {self.start}" if len(self) == 1 else f"layers {self.start}-{self.stop - 1}"


@dataclass(frozen=True)
class Step:
    """One stage of a routed forward."""

    layers: Span  # decoder layers run in turn (for the side branch: its layers 0..D-1)
    queries: str = ALL  # token set whose positions issue queries and are updated: all, text or image
    side: bool = False  # the side branch (on the image positions), not decoder layers
    image_from_side: bool = False  # before the step, image positions take the side-branch output
    image_kv: bool = False  # text queries; the image positions' states give keys/values only
    prune: bool = False  # FastV: this (single) layer's last-token attention ranks the image tokens,
    # and the lowest-ranked `fastv_ratio` of them are dropped for every later step

    def keys(self) -> str:
        """Which tokens this step's layers attend over (and the routed cache keeps): all or text."""
        return ALL if self.queries == ALL or self.image_kv else self.queries


def _shared(cfg: DPVRConfig, n: int, prune: bool) -> list[Step]:
    """Layers [0, n) on every token; with `prune`, FastV at cfg.fastv_layer (< n, validate_for)."""
    if not prune:
        return [Step(Span(0, n))]
    f = cfg.fastv_layer
    return [Step(Span(0, f)), Step(Span(f, f + 1), prune=True), Step(Span(f + 1, n))]


def fusion_layers_of(cfg: DPVRConfig, L: int) -> tuple[int, ...]:
    """LF's fusion layers: `fusion_at` when given, else the last K."""
    return tuple(cfg.fusion_at) if cfg.fusion_at else tuple(range(L - cfg.fusion_layers, L))


def _lf(cfg: DPVRConfig, L: int) -> list[Step]:
    fusion = set(fusion_layers_of(cfg, L))
    steps = [Step(Span(0, cfg.side_depth), IMAGE, side=True)] if fusion else []  # LF-ideal never runs it
    i = cfg.split_layer
    while i < L:
        j = i
        while j + 1 < L and (j + 1 in fusion) == (i in fusion):
            j += 1  # [i, j]: a run of text-only layers, or of consecutive fusion layers
        if i not in fusion:
            steps.append(Step(Span(i, j + 1), TEXT))
        else:
            if j > i:
                steps.append(Step(Span(i, j), ALL, image_from_side=True))
            steps.append(Step(Span(j, j + 1), TEXT, image_from_side=j == i, image_kv=True))
        i = j + 1
    return steps


def _pc(cfg: DPVRConfig, L: int) -> list[Step]:
    side = Step(Span(0, cfg.side_depth), IMAGE, side=True)
    return [side] + [Step(Span(i, i + 1), ALL, image_from_side=True) for i in range(cfg.split_layer, L)]


def _kv(cfg: DPVRConfig, L: int) -> list[Step]:
    side = Step(Span(0, cfg.side_depth), IMAGE, side=True)
    return [side, Step(Span(cfg.split_layer, L), TEXT, image_from_side=True, image_kv=True)]


def _vtw(cfg: DPVRConfig, L: int) -> list[Step]:
    return [Step(Span(cfg.split_layer, L), TEXT)]


# deep-layer schedules of the modes with a split; vanilla and fastv have no deep part
_DEEP: dict[str, Callable[[DPVRConfig, int], list[Step]]] = {"lf": _lf, "pc": _pc, "kv": _kv, "vtw": _vtw}
assert set(_DEEP) == {m for m, t in MODE_TRAITS.items() if t.split}, "every split mode needs a schedule"


def compile_schedule(cfg: DPVRConfig, num_layers: int, has_images: bool = True) -> list[Step]:
    """The steps of one forward of `cfg` on a model with num_layers decoder layers. Without an image
    in the batch every mode runs the stock computation (all layers on every token)."""
    cfg.validate_for(num_layers)
    traits = MODE_TRAITS[cfg.mode]
    if not has_images or not traits.split:
        steps = _shared(cfg, num_layers, prune=has_images and traits.fastv)
    else:
        steps = _shared(cfg, cfg.split_layer, prune=cfg.shallow_fastv) + _DEEP[cfg.mode](cfg, num_layers)
    return [s for s in steps if len(s.layers)]


def split_schedule(cfg: DPVRConfig, num_layers: int, has_images: bool = True) -> tuple[list[Step], list[Step]]:
    """compile_schedule's steps as (the frozen part, the rest), for a mode with a split and no pruning
    inside the shared stack: what a cache of the frozen part's output skips (`routed_decoder(shared=...)`,
    dpvr.train.shared_cache). The frozen part is the shared stack [0, split) and then the deep text-only
    layers before the first step that reads the side branch (LF's text path up to its first fusion
    layer, all of VTW's): they update text positions only, which the side branch does not read, so they
    may run before it and their output is the same whatever the side branch is. A batch without images
    runs the stock layers, cut at the same places (its text path is every token)."""
    if not MODE_TRAITS[cfg.mode].split or cfg.shallow_fastv:
        what = "shallow_fastv prunes inside it" if cfg.shallow_fastv else f"mode {cfg.mode!r} has no split"
        raise DPVRError(f"no shared stack to cache: {what}")
    s, steps = cfg.split_layer, compile_schedule(cfg, num_layers)
    assert steps[0] == Step(Span(0, s)), f"the schedule does not start with the shared stack: {summary(steps)}"
    t = s  # how deep the text path goes before a step reads the side branch
    for step in (x for x in steps[1:] if not x.side):
        if step.queries != TEXT or step.image_from_side or step.image_kv:
            break
        t = step.layers.stop
    if not has_images:
        stock = [Step(Span(0, s)), Step(Span(s, t)), Step(Span(t, num_layers))]
        return [x for x in stock[:2] if len(x.layers)], [x for x in stock[2:] if len(x.layers)]
    return [x for x in steps if not x.side and x.layers.stop <= t], [x for x in steps if x.side or x.layers.start >= t]


def frozen_text_depth(cfg: DPVRConfig, num_layers: int) -> int:
    """How many layers the text positions of split_schedule's frozen part have been through: the split
    for PC and KV, LF's first fusion layer, all layers for LF-ideal and VTW."""
    return split_schedule(cfg, num_layers)[0][-1].layers.stop


def layer_contents(steps: list[Step], num_layers: int) -> list[tuple[str, bool]]:
    """Per decoder layer: (the tokens its keys/values cover, all or text; whether FastV had pruned
    before it). This is what a routed prefill leaves in each layer of the RoutedCache."""
    out: list[tuple[str, bool] | None] = [None] * num_layers
    pruned = False
    for step in steps:
        if not step.side:
            for i in step.layers:
                out[i] = (step.keys(), pruned)
        pruned |= step.prune
    assert all(c is not None for c in out), f"the schedule leaves layers {[i for i, c in enumerate(out) if c is None]} out"
    return out


def summary(steps: list[Step]) -> str:
    """The plan in one line, e.g. 'layers 0-17 all | side x1 image | layers 18-30 text | layer 31 text+image kv'."""
    parts = []
    for s in steps:
        if s.side:
            parts.append(f"side x{len(s.layers)} image")
            continue
        what = "text+image kv" if s.image_kv else s.queries
        parts.append(f"{s.layers} {'image<-side ' if s.image_from_side else ''}{what}{' FastV' if s.prune else ''}")
    return " | ".join(parts)
