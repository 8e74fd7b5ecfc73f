"""Measured prefill latency, cached decode rate, KV-cache bytes and peak memory for every mode.

All modes run on the SAME weights (one converted model, switched with `model.routing(...)`), in one
process, interleaved: every repeat visits every mode once, after warm-up, and medians are reported
with ratios against vanilla (the stock HF forward and its DynamicCache). The timing primitives here
are shared by `dpvr bench` and `dpvr demo`.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dpvr.bench.cpu_malloc import minor_faults
from dpvr.bench.vision_flops import crops, default_image, family, image_tokens, patch_grids
from dpvr.data.collate import IGNORE
from dpvr.hf_compat import STOCK_CACHE_KWARG, output_cache
from dpvr.routing import DPVRForConditionalGeneration
from dpvr.routing.cache import RoutedCache

# name -> routing overrides applied to a model converted with a side branch
MODE_ROUTING: dict[str, dict] = {
    "vanilla": {"mode": "vanilla"},
    "lf": {"mode": "lf"},
    "lf-ideal": {"mode": "lf", "fusion_layers": 0},
    "pc": {"mode": "pc"},
    "kv": {"mode": "kv"},
    "fastv": {"mode": "fastv"},
    "vtw": {"mode": "vtw"},
    "lf+fastv": {"mode": "lf", "shallow_fastv": True},  # beyond the paper: FastV inside [0, s) as well
}


@dataclass
class Workload:
    input_ids: torch.Tensor  # (B, T)
    vision: dict  # pixel_values and the family's image inputs (image_sizes, image_grid_thw)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    @property
    def inputs(self) -> dict:
        return {"input_ids": self.input_ids, **self.vision}


def _images(config, batch: int, g: torch.Generator) -> dict:
    """One image of the preset's size per row, as the family's processor would hand it over."""
    size, v = default_image(config), config.vision_config
    if patch_grids(config):
        t, h, w = size
        patch = v.in_channels * v.temporal_patch_size * v.patch_size**2
        return {"pixel_values": torch.randn(batch * t * h * w, patch, generator=g),
                "image_grid_thw": torch.tensor([size] * batch)}  # fmt: skip
    if family(config) == "llava":  # resized to the tower's square
        return {"pixel_values": torch.randn(batch, 3, v.image_size, v.image_size, generator=g)}
    px = torch.randn(batch, crops(config, size, 1), 3, v.image_size, v.image_size, generator=g)  # anyres tiles
    return {"pixel_values": px, "image_sizes": torch.tensor([size] * batch)}


def make_workload(config, n_text: int, batch: int, device, dtype, seed: int = 0) -> Workload:
    """One image per row at the front (after a BOS-like token), then n_text - 1 text tokens."""
    g = torch.Generator().manual_seed(seed)
    n_img = image_tokens(config, [default_image(config)])
    vocab = config.text_config.vocab_size
    text = torch.randint(3, min(vocab, 30000), (batch, n_text), generator=g)
    text[text == config.image_token_id] = 3
    img = torch.full((batch, n_img), config.image_token_id)
    ids = torch.cat([text[:, :1], img, text[:, 1:]], dim=1)
    images = _images(config, batch, g)
    if patch_grids(config):  # Qwen2-VL's processor marks image tokens; its stock forward needs the marks
        images["mm_token_type_ids"] = (ids == config.image_token_id).int()
    vision = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in images.items()}
    return Workload(ids.to(device), vision)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def timed_with_faults(fn: Callable[[], object], device) -> tuple[float, int | None]:
    """Seconds of fn, and the minor page faults the process took meanwhile (None where not counted)."""
    before = minor_faults()
    seconds = timed(fn, device)
    return seconds, None if before is None else minor_faults() - before


PREFILL_LOGITS = 1  # positions a timed prefill computes logits for: the next token's, as generate() does


@torch.inference_mode()
def prefill(model, w: Workload, use_cache: bool = False):
    return model(**w.inputs, use_cache=use_cache, logits_to_keep=PREFILL_LOGITS)


@torch.inference_mode()
def decode(model, w: Workload, n_new: int, use_cache: bool = True) -> None:
    """Greedy decode n_new tokens after the prompt (cached: one token per step; else full recompute)."""
    ids = w.input_ids
    if use_cache:
        out = prefill(model, w, use_cache=True)
        decode_steps(model, out, n_new - 1)
        return
    vision = dict(w.vision)
    for _ in range(n_new):
        out = model(input_ids=ids, **vision, use_cache=False, logits_to_keep=1)
        ids = torch.cat([ids, _greedy_text_token(model, out.logits)], dim=1)
        if "mm_token_type_ids" in vision:  # one mark per token: the new one is text
            vision["mm_token_type_ids"] = torch.nn.functional.pad(vision["mm_token_type_ids"], (0, 1))


def _greedy_text_token(model, logits: torch.Tensor) -> torch.Tensor:
    """(B, 1) argmax of the last position, never the image token: random weights can pick it, and an
    image token after the prompt is (rightly) refused by the routed cache."""
    last = logits[:, -1].clone()
    last[:, model.config.image_token_id] = float("-inf")
    return last.argmax(-1, keepdim=True)


@torch.inference_mode()
def decode_steps(model, out, n_steps: int):
    """Continue a cached forward `out` by n_steps greedy tokens, one token per step."""
    for _ in range(n_steps):
        nxt = _greedy_text_token(model, out.logits)
        out = model(input_ids=nxt, **{STOCK_CACHE_KWARG: output_cache(out)}, use_cache=True, logits_to_keep=1)
    return out


@torch.inference_mode()
def kv_cache_bytes(model, w: Workload) -> int:
    cache = output_cache(prefill(model, w, use_cache=True))
    if isinstance(cache, RoutedCache):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def peak_memory(fn: Callable[[], object], device) -> int:
    """Peak bytes allocated during fn above what was live before it. CUDA: the allocator's statistics.
    CPU: torch's CPU allocator keeps none, so the profiler records every allocation and free made
    during fn and the peak of their running sum is taken (slower than fn alone: never timed)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # kineto writes a line to fd 2 at every start and stop
        prof.start()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    events = prof.profiler.kineto_results.events()
    deltas = [e.nbytes() for e in sorted(events, key=lambda e: e.start_ns()) if e.name() == "[memory]"]  # + alloc, - free
    return max(itertools.accumulate(deltas, initial=0))


@contextlib.contextmanager
def _native_stderr_silenced():
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(devnull)


def saving_share(time_ratio: float, flop_ratio: float) -> float:
    """Measured saving as a share of the analytic one: (1 - time ratio) / (1 - FLOP ratio)."""
    return (1 - time_ratio) / (1 - flop_ratio) if flop_ratio < 1 else float("nan")


def saving_shares(row: dict, mode: str) -> tuple[float, float, float]:
    """A `dpvr bench` prefill row's saving share for mode: at the median paired ratio, and at its slower
    and faster quartile (the higher time ratio is the lower share)."""
    f, (fast, slow) = row["flop_ratio"][mode], row["ratio_iqr"][mode]
    return saving_share(row["ratio"][mode], f), saving_share(slow, f), saving_share(fast, f)


def abba_order(modes: list[str], k: int) -> list[str]:
    """Round/step k's visiting order: forward on even k, backward on odd (ABBA)."""
    return modes if k % 2 == 0 else modes[::-1]


@dataclass
class Samples:
    """Seconds per mode from one interleaved run: seconds[m][i] and seconds[ref][i] were taken moments
    apart (same round, or same decode step), so their ratio cancels drift in the machine's speed."""

    seconds: dict[str, list[float]]
    faults: dict[str, list[int | None]] = field(default_factory=dict)  # page faults per timed call (None: not counted)

    @classmethod
    def collecting(cls, modes: list[str]) -> "Samples":
        return cls({m: [] for m in modes}, {m: [] for m in modes})

    def add(self, mode: str, seconds: float, faults: int | None) -> None:
        self.seconds[mode].append(seconds)
        self.faults[mode].append(faults)

    def median(self, mode: str) -> float:
        return statistics.median(self.seconds[mode])

    def median_faults(self, mode: str) -> float | None:
        f = self.faults.get(mode)
        return None if not f or None in f else statistics.median(f)

    def ratio(self, mode: str, ref: str = "vanilla") -> float:
        """Median of the paired ratios mode/ref."""
        return statistics.median(self.paired(mode, ref))

    def ratio_iqr(self, mode: str, ref: str = "vanilla") -> tuple[float, float]:
        """Quartiles of the paired ratios: the spread a single repeat would show."""
        r = self.paired(mode, ref)
        if len(r) < 2:
            return r[0], r[0]
        q = statistics.quantiles(r, n=4, method="inclusive")  # within the samples, never extrapolated
        return q[0], q[2]

    def paired(self, mode: str, ref: str) -> list[float]:
        a, b = self.seconds[mode], self.seconds[ref]
        assert len(a) == len(b) > 0, f"{mode} has {len(a)} samples, {ref} {len(b)}: not paired"
        return [x / y for x, y in zip(a, b)]


def interleaved(
    model: DPVRForConditionalGeneration,
    modes: list[str],
    fn: Callable[[object], object],
    device,
    repeats: int,
    warmup: int = 1,
    progress=None,
) -> Samples:
    """Seconds of fn(model) per mode; every round visits every mode, in alternating direction (ABBA), so a
    mode neither always follows the same one nor always runs first. fn may return its own measured
    seconds (a float), e.g. to leave set-up work out of the timing."""
    samples = Samples.collecting(modes)
    for r in range(warmup + repeats):
        for m in abba_order(modes, r):
            with model.routing(**MODE_ROUTING[m]):
                box = []
                t, n = timed_with_faults(lambda: box.append(fn(model)), device)
                t = box[0] if isinstance(box[0], float) else t
            if r >= warmup:
                samples.add(m, t, n)
            if progress is not None:
                progress.update(1)
    return samples


def interleaved_decode(
    model: DPVRForConditionalGeneration,
    modes: list[str],
    w: Workload,
    n_new: int,
    device,
    repeats: int,
    warmup: int = 1,
    progress=None,
) -> Samples:
    """Seconds per cached greedy decode step, per mode, interleaved step by step: each round every mode
    prefills its own cache (not timed), then every step advances every mode by one token in turn (ABBA
    within the round). A decode step is tens of milliseconds, so pairing modes step by step, rather
    than whole decodes, keeps a slow moment of the machine from landing on one mode only."""
    samples = Samples.collecting(modes)
    for r in range(warmup + repeats):
        outs = {}
        for m in modes:
            with model.routing(**MODE_ROUTING[m]):
                outs[m] = prefill(model, w, use_cache=True)
        for step in range(n_new - 1):
            for m in abba_order(modes, step):
                with model.routing(**MODE_ROUTING[m]):
                    t, n = timed_with_faults(lambda: outs.__setitem__(m, decode_steps(model, outs[m], 1)), device)
                if r >= warmup:
                    samples.add(m, t, n)
                if progress is not None:
                    progress.update(1)
        del outs
    return samples


def train_step_seconds(model, w: Workload, checkpointing: bool, device, repeats: int = 3) -> dict:
    """Median forward+backward seconds and peak bytes of the current routing, labels on the text."""
    labels = w.input_ids.masked_fill(w.input_ids == model.config.image_token_id, IGNORE)
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()

    def step():
        model(**w.inputs, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    try:
        step()  # warm-up
        secs = statistics.median(timed(step, device) for _ in range(repeats))
        peak = peak_memory(step, device)
    finally:
        model.eval()
        if checkpointing:
            model.activation_checkpointing_disable()
    return {"seconds": secs, "peak_bytes": peak}
