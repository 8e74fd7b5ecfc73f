"""`dpvr breakdown`: where one prefill's time goes, stage by stage, in a routed mode against vanilla.

    dpvr breakdown                                      # CPU preset, LF vs vanilla, 576 image + 64 text tokens
    dpvr breakdown --modes lf,vtw --text-len 128 --repeats 20
    dpvr breakdown --preset llava-1.5-7b --device cuda  # the real 7B shape (GPU)

A stage is one step of the routed layer schedule (`dpvr.routing.forward`): a run of layers on one
token set, the side branch, a text-query layer; vanilla's stock layers (timed one by one through
module hooks) are summed over the same layer ranges. Per stage: the median milliseconds over
interleaved rounds (the same protocol as `dpvr bench`), the FLOPs `torch.utils.flop_counter` counts
in it (in a separate, untimed forward; `dpvr.bench.flops.flop_counter`, which also sees sdpa's CPU kernel), and their rate. Each stage's *excess* is its time minus what
its FLOPs would take at vanilla's own decoder-layer rate, which attributes the gap between a mode's
measured saving and its FLOP saving to the stages that cause it. Stage boundaries synchronise the
device, so on a GPU the totals here run a little slower than `dpvr bench`'s. Writes
OUT/breakdown.json and OUT/breakdown.png.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dpvr.bench.cli import add_model_arguments, setup, write_outputs
from dpvr.bench.flops import flop_counter
from dpvr.cli_types import at_least
from dpvr.routing.schedule import Span

if TYPE_CHECKING:
    from torch.utils.flop_counter import FlopCounterMode

    from dpvr.bench import latency as lat
# torch and the timing helpers are imported where a measurement runs: `dpvr breakdown --help` answers at once

VISION = "vision tower"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--modes", default="lf", help="routed modes to break down, comma-separated (vanilla is the reference)")
    p.add_argument("--text-len", type=at_least(1), default=64, help="text tokens in the prompt (image tokens come extra)")
    p.add_argument("--batch", type=at_least(1), default=1)
    p.add_argument("--repeats", type=at_least(1), default=10, help="timed rounds, after one warm-up round")
    p.add_argument("--out", default="runs/breakdown", help="output folder")


class StageClock:
    """Seconds (and, given a FlopCounterMode, FLOPs) per named stage of one forward. Stages nested in
    a stage count toward the outermost only."""

    def __init__(self, device):
        from dpvr.bench import latency as lat

        self.device, self._sync = device, lat.sync
        self.reset()

    def reset(self, counter: FlopCounterMode | None = None) -> None:
        self.counter = counter
        self.seconds: dict[str, float] = {}  # in the order the stages ran
        self.flops: dict[str, int] = {}
        self.layers: dict[str, Span | None] = {}
        self._open: list[str] = []

    def begin(self, name: str, layers: Span | None = None) -> None:
        self._open.append(name)
        if len(self._open) == 1:
            self._sync(self.device)
            self.layers[name] = layers
            self._start = (time.perf_counter(), self.counter.get_total_flops() if self.counter else 0)

    def end(self) -> None:
        name = self._open.pop()
        if not self._open:
            self._sync(self.device)
            t0, f0 = self._start
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            if self.counter:
                self.flops[name] = self.flops.get(name, 0) + self.counter.get_total_flops() - f0

    @contextlib.contextmanager
    def stage(self, name: str, layers: Span | None = None):
        self.begin(name, layers)
        try:
            yield
        finally:
            self.end()

    @contextlib.contextmanager
    def watching(self, model):
        """Routed stages through the loop's stage hook; the vision tower and each stock decoder layer
        (which only vanilla calls as modules) through forward hooks."""
        from dpvr.routing.forward import observe_stages

        modules = [(VISION, None, model.model.vision_tower)]
        modules += [(f"layer {i}", Span(i, i + 1), m) for i, m in enumerate(model.model.language_model.layers)]
        handles = []
        for name, layers, m in modules:
            handles.append(m.register_forward_pre_hook(lambda *_, n=name, r=layers: self.begin(n, r)))
            handles.append(m.register_forward_hook(lambda *_: self.end()))
        try:
            with observe_stages(self.stage):
                yield self
        finally:
            for h in handles:
                h.remove()


def measure(model, modes: list[str], w: lat.Workload, device, repeats: int, progress=None) -> dict:
    """Per mode: FLOPs per stage (one counted forward) and per-round seconds per stage and in total."""
    from dpvr.bench import latency as lat

    clock = StageClock(device)
    out = {m: {"rounds": [], "totals": []} for m in modes}
    with clock.watching(model):
        for m in modes:
            with model.routing(**lat.MODE_ROUTING[m]), flop_counter() as counter:
                clock.reset(counter)
                lat.prefill(model, w)
                out[m]["flops"] = dict(clock.flops)
                out[m]["layers"] = {n: None if r is None else [r.start, r.stop] for n, r in clock.layers.items()}
                out[m]["flops_total"] = counter.get_total_flops()
        for r in range(1 + repeats):  # round 0 warms up
            for m in lat.abba_order(modes, r):
                with model.routing(**lat.MODE_ROUTING[m]):
                    clock.reset()
                    total = lat.timed(lambda: lat.prefill(model, w), device)
                if r > 0:
                    out[m]["rounds"].append(dict(clock.seconds))
                    out[m]["totals"].append(total)
                if progress is not None:
                    progress.update(1)
    return out


def stage_table(raw: dict, mode: str) -> dict:
    """Mode's stages next to vanilla's time and FLOPs over the same layers, with rates and excess."""
    from dpvr.bench import latency as lat

    van, run = raw["vanilla"], raw[mode]
    layer_names = [n for n in van["flops"] if n.startswith("layer ")]
    van_layer_s = statistics.median(sum(r[n] for n in layer_names) for r in van["rounds"])
    rate = sum(van["flops"][n] for n in layer_names) / van_layer_s  # vanilla's decoder-layer FLOP/s

    def vanilla_over(layers: list[int] | None) -> tuple[float | None, int | None]:
        """Vanilla's median seconds and FLOPs in layers [start, stop), or None where the stage has no layers."""
        names = [n for n in layer_names if layers is not None and van["layers"][n][0] in range(*layers)]
        if not names:
            return None, None
        return statistics.median(sum(r[n] for n in names) for r in van["rounds"]), sum(van["flops"][n] for n in names)

    stages = []
    for name, flops in run["flops"].items():
        seconds = statistics.median(r.get(name, 0.0) for r in run["rounds"])
        if name == VISION:
            v_s, v_f = statistics.median(r[VISION] for r in van["rounds"]), van["flops"][VISION]
        else:
            v_s, v_f = vanilla_over(run["layers"][name])
        decoder = name != VISION
        stages.append({"name": name, "seconds": seconds, "flops": flops, "vanilla_seconds": v_s, "vanilla_flops": v_f,
                       "excess_seconds": seconds - flops / rate if decoder else None})  # fmt: skip
    other = lambda rounds, totals: statistics.median(t - sum(r.values()) for r, t in zip(rounds, totals))  # noqa: E731
    ratio = statistics.median(a / b for a, b in zip(run["totals"], van["totals"]))
    flop_ratio = run["flops_total"] / van["flops_total"]
    excess = sum(s["excess_seconds"] for s in stages if s["excess_seconds"] is not None)
    other_s, van_other_s = other(run["rounds"], run["totals"]), other(van["rounds"], van["totals"])
    # every stage at vanilla's layer rate, and no more time outside the stages than vanilla takes
    ideal_ratio = ratio - (excess + other_s - van_other_s) / statistics.median(van["totals"])
    return {
        "stages": stages, "other_seconds": other_s, "vanilla_other_seconds": van_other_s,
        "total_seconds": statistics.median(run["totals"]), "vanilla_total_seconds": statistics.median(van["totals"]),
        "ratio": ratio, "flop_ratio": flop_ratio, "vanilla_layer_flops_per_s": rate, "excess_seconds": excess,
        "saving_share": lat.saving_share(ratio, flop_ratio),
        "saving_share_at_vanilla_rate": lat.saving_share(ideal_ratio, flop_ratio),
    }  # fmt: skip


def summary(result: dict) -> str:
    lines = [f"device: {result['device']} ({result['dtype']}, {result['threads']} threads), preset {result['preset']}, "
             f"batch {result['batch']}, {result['n_img']} image + {result['n_txt']} text tokens, {result['repeats']} rounds"]  # fmt: skip
    ms = lambda s: "-" if s is None else f"{1000 * s:.1f}"  # noqa: E731
    pct = lambda x: "n/a (no FLOP saving)" if x != x else f"{x:.0%}"  # noqa: E731  (NaN where FLOPs do not drop)
    for mode, t in result["modes"].items():
        other = "everything else (embeddings, masks, projector, norm, lm_head)"
        w = max(len(other), *(len(s["name"]) for s in t["stages"])) + 2
        lines.append(f"\n{mode + ', stages in run order':<{w}}{'vanilla ms':>11}{mode + ' ms':>11}{'GFLOP':>8}{'GFLOP/s':>9}{'excess ms':>11}")
        for s in t["stages"]:
            gflops = s["flops"] / 1e9
            lines.append(f"{s['name']:<{w}}{ms(s['vanilla_seconds']):>11}{ms(s['seconds']):>11}{gflops:>8.2f}"
                         f"{gflops / s['seconds']:>9.0f}{ms(s['excess_seconds']):>11}")  # fmt: skip
        lines.append(f"{other:<{w}}{ms(t['vanilla_other_seconds']):>11}{ms(t['other_seconds']):>11}")
        lines.append(f"{'total':<{w}}{ms(t['vanilla_total_seconds']):>11}{ms(t['total_seconds']):>11}")
        lines.append(f"vanilla's decoder layers run at {t['vanilla_layer_flops_per_s'] / 1e9:.0f} GFLOP/s. {mode}: "
                     f"{t['ratio']:.3f}x vanilla's time (median paired ratio) for {t['flop_ratio']:.3f}x its counted FLOPs: "
                     f"it saves {pct(t['saving_share'])} of its FLOP saving, and would save "
                     f"{pct(t['saving_share_at_vanilla_rate'])} with every stage at vanilla's layer rate and "
                     f"everything else as fast as vanilla's ({ms(t['excess_seconds'])} + "
                     f"{ms(t['other_seconds'] - t['vanilla_other_seconds'])} ms removed)")  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from dpvr.bench import latency as lat

    s = setup(args)
    if len(s.modes) < 2:
        raise ValueError(f"--modes {args.modes!r} names no routed mode to break down against vanilla")
    w = lat.make_workload(s.model.config, args.text_len, args.batch, s.device, s.dtype)
    bar = tqdm(total=(1 + args.repeats) * len(s.modes), desc="breakdown", unit="prefill")
    raw = measure(s.model, s.modes, w, s.device, args.repeats, progress=bar)
    bar.close()
    result = {**s.header(args.preset), "n_txt": args.text_len, "batch": args.batch, "repeats": args.repeats,
              "modes": {m: stage_table(raw, m) for m in s.modes[1:]}, "raw": raw}  # fmt: skip
    from dpvr.bench.plots import plot_breakdown

    write_outputs(Path(args.out), "breakdown", result, plot_breakdown, summary)
    return 0
