"""What a DPVR checkpoint's routing becomes inside vLLM: a short list of stages over vLLM's flat batch.

vLLM runs every scheduled token of every request as one flat batch through each decoder layer, with
per-layer attention metadata saying which cached keys each query reads. A stage here is a run of
consecutive decoder layers and the token set they run on:

  - all tokens, with vLLM's own metadata (the shared stack [0, s) and LF's fusion layers);
  - text tokens only, with text-only metadata (`dpvr.serve.vllm.metadata`): LF's text-only layers
    [s, L-K) and all of VTW's deep layers, whose KV cache then holds text tokens only.

and, for a mode with a fusion, the side branch on each request's image tokens. This module is plain
Python on top of `dpvr.routing.schedule` (no vLLM import), so what is refused, and why, is testable
without vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass

from dpvr.config import DPVRConfig
from dpvr.errors import DPVRError
from dpvr.routing.schedule import ALL, TEXT, Span, compile_schedule

# Modes vLLM runs, with the routing that makes them worth it. PC and KV keep image keys/values that
# differ per deep layer from a fixed side-branch state, and FastV drops tokens chosen at run time: none
# of them fits "one KV slot per token and layer set" without a custom KV manager.
SERVED_MODES = ("vanilla", "lf", "vtw")


@dataclass(frozen=True)
class Stage:
    layers: Span  # decoder layers run in turn
    text_only: bool = False  # on the text tokens, with the text-only attention metadata
    images_from_side: bool = False  # before the stage, image rows take the side-branch output
    side_before: bool = False  # before the stage (and any reset), the side branch runs on the image rows


@dataclass(frozen=True)
class ServingPlan:
    stages: tuple[Stage, ...]

    @property
    def routes(self) -> bool:
        """Whether any layer runs on text alone (else every stage is the stock computation)."""
        return any(s.text_only for s in self.stages)


def check_servable(cfg: DPVRConfig) -> None:
    """One-line refusal of a routing vLLM cannot run."""
    if cfg.mode not in SERVED_MODES:
        raise DPVRError(f"dpvr's vLLM plugin serves modes {', '.join(SERVED_MODES)}, not {cfg.mode!r}: "
                        "run this checkpoint with dpvr's own generate (HF)")  # fmt: skip
    if cfg.shallow_fastv:
        raise DPVRError("dpvr's vLLM plugin does not serve shallow_fastv (FastV pruning inside the shared layers)")


def serving_plan(cfg: DPVRConfig, num_layers: int) -> ServingPlan:
    """The stages of cfg's schedule for an image prompt (`compile_schedule`), as vLLM runs them.

    A schedule step with text queries over image keys/values (the last layer of an LF fusion run) runs
    here on all tokens: its text outputs are the same (image rows are queries that nothing reads
    afterwards: text-only layers skip them, the next fusion run resets them, logits read text rows),
    and the image keys/values it writes are what the schedule's keys/values-only step would attend over.
    On a one-layer fusion run that costs the image rows' query, o_proj and MLP of one layer."""
    check_servable(cfg)
    stages, side_next = [], False
    for step in compile_schedule(cfg, num_layers, has_images=True):
        if step.side:
            side_next = True
            continue
        if step.queries == TEXT and not step.image_kv:
            stages.append(Stage(step.layers, text_only=True, side_before=side_next))
        else:
            assert step.queries == ALL or len(step.layers) == 1, f"unexpected step {step}"
            stages.append(Stage(step.layers, images_from_side=step.image_from_side, side_before=side_next))
        side_next = False
    return ServingPlan(tuple(_merged(stages)))


def _merged(stages: list[Stage]) -> list[Stage]:
    """Adjacent all-token stages as one when the later one resets nothing (fewer gathers)."""
    out: list[Stage] = []
    for s in stages:
        prev = out[-1] if out else None
        plain = not s.text_only and not s.images_from_side and not s.side_before
        if prev and not prev.text_only and plain and prev.layers.stop == s.layers.start:
            out[-1] = Stage(Span(prev.layers.start, s.layers.stop), images_from_side=prev.images_from_side,
                            side_before=prev.side_before)  # fmt: skip
        else:
            out.append(s)
    return out
