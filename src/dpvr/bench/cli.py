"""`dpvr bench`: prefill latency, cached decode, KV-cache bytes, memory and a training step, per mode.

    dpvr bench                                   # CPU preset: 7B depth and split, narrow width
    dpvr bench --preset llava-1.5-7b --dtype bfloat16 --device cuda   # real 7B shape, random weights
    dpvr bench --preset tiny --text-lens 16,32   # the embedded tiny LLaVA's shape

Writes OUT/bench.json and OUT/bench.png. Every mode runs on the same weights in one process,
interleaved after warm-up (prefill round by round, decode step by step); per mode the median time and
the median of its paired ratios to vanilla (the stock HF forward), with their quartiles, are reported
next to the analytic FLOP ratio at the same shape (`dpvr flops`, lm_head on the one position a
prefill computes logits for). Raw samples go to the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from dpvr.atomic import atomic_write_text
from dpvr.bench.flops import forward_flops
from dpvr.bench.presets import PRESETS, build_random_model
from dpvr.bench.vision_flops import default_image, image_tokens
from dpvr.cli_types import at_least, int_list
from dpvr.config import DPVRConfig, add_routing_arguments

if TYPE_CHECKING:
    import torch

    from dpvr.bench import latency as lat
    from dpvr.routing import DPVRForConditionalGeneration
# torch, tqdm, the timing helpers and the routed model are imported where a measurement runs, so that
# `dpvr bench --help` answers at once


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model a measurement runs on (shared with `dpvr breakdown`)."""
    p.add_argument("--preset", default="cpu-7b-narrow",
                   help=f"architecture, random weights: one of {sorted(PRESETS)} or a checkpoint folder")  # fmt: skip
    add_routing_arguments(p, ("split_layer", "fusion_layers", "fusion_at", "side_depth"), split_layer=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when one is available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: fix glibc malloc's thresholds so freed tensor memory is reused, not returned to the OS "
                        "and faulted in again at a cost that depends on which mode ran before (dpvr.bench.cpu_malloc)")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--modes", default="vanilla,lf,lf-ideal,pc,kv,fastv,vtw,lf+fastv",
                   help="comma-separated; lf+fastv: LF with FastV pruning in the shared layers (beyond the paper)")  # fmt: skip
    p.add_argument("--text-lens", type=int_list(1), default="32,64,128,256", help="text tokens per prompt (image tokens come extra)")
    p.add_argument("--batches", type=int_list(1), default="1,4", help="batch sizes for prefill")
    p.add_argument("--new-tokens", type=at_least(1), default=64, help="decode length for the cached decode rate")
    p.add_argument("--recompute-text-len", type=at_least(0), default=64,
                   help="text length for the cached vs full-recompute (paper's) decode comparison; 0 skips it")  # fmt: skip
    p.add_argument("--repeats", type=at_least(1), default=5)
    p.add_argument("--train-step", action=argparse.BooleanOptionalAction, default=True,
                   help="also time an LF and a PC training step with and without activation checkpointing")  # fmt: skip
    p.add_argument("--out", default="runs/bench", help="output folder")


@dataclass
class Setup:
    model: DPVRForConditionalGeneration  # converted, eval mode; every mode is a `model.routing(...)` away
    cfg: DPVRConfig  # the LF routing the model was converted with
    modes: list[str]  # vanilla first
    device: torch.device
    dtype: torch.dtype
    malloc: str | None  # what dpvr.bench.cpu_malloc set, or None

    def header(self, preset: str) -> dict:
        """What every result file records about the run it comes from."""
        import torch

        return {"preset": preset, "device": device_name(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(), "cpu_malloc": self.malloc, "routing": self.cfg.to_dict(),
                "n_img": image_tokens(self.model.config, [default_image(self.model.config)])}  # fmt: skip


def setup(args: argparse.Namespace) -> Setup:
    """Threads, allocator, a random model of the preset's shape, converted; the --modes checked."""
    import torch

    from dpvr.bench import latency as lat
    from dpvr.bench.cpu_malloc import keep_freed_memory
    from dpvr.model_flags import resolve_device
    from dpvr.routing import convert

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(resolve_device(args.device))
    malloc = keep_freed_memory() if device.type == "cpu" and args.keep_freed_memory else None
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    base = build_random_model(args.preset, dtype=dtype, device=device)
    model = convert(base, DPVRConfig.from_namespace(args, mode="lf")).eval()  # convert resolves --split-layer
    cfg = model.dpvr_config
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(lat.MODE_ROUTING))
    if unknown:
        raise ValueError(f"unknown --modes {unknown}; choose from {sorted(lat.MODE_ROUTING)}")
    modes = ["vanilla"] + [m for m in modes if m != "vanilla"]
    return Setup(model, cfg, modes, device, dtype, malloc)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from dpvr.bench import latency as lat

    setup_ = setup(args)
    model, cfg, modes, device, dtype = setup_.model, setup_.cfg, setup_.modes, setup_.device, setup_.dtype
    text_lens, batches = args.text_lens, args.batches
    n_img = image_tokens(model.config, [default_image(model.config)])

    steps = len(batches) * len(text_lens) * (args.repeats + 1) * len(modes)  # prefill
    steps += (args.repeats + 1) * max(args.new_tokens - 1, 0) * len(modes)  # cached decode steps
    bar = tqdm(total=steps, desc="bench", unit="run")
    result: dict = {**setup_.header(args.preset), "modes": modes, "prefill": [], "decode": {}, "kv_cache_bytes": {},
                    "train_step": []}  # fmt: skip
    for batch in batches:
        for n_txt in text_lens:
            w = lat.make_workload(model.config, n_txt, batch, device, dtype)
            t = lat.interleaved(model, modes, lambda m: lat.prefill(m, w), device, args.repeats, progress=bar)
            flops = {m: _flops(model.config, m, cfg, n_img, n_txt, batch) for m in modes}
            row = {"batch": batch, "n_txt": n_txt, **_timing_fields(t, modes), "flop_ratio": {}, "peak_bytes": {}}
            for m in modes:
                with model.routing(**lat.MODE_ROUTING[m]):  # as generate prefills: building the cache
                    row["peak_bytes"][m] = lat.peak_memory(lambda: lat.prefill(model, w, use_cache=True), device)
                row["flop_ratio"][m] = flops[m] / flops["vanilla"]
            result["prefill"].append(row)

    w = lat.make_workload(model.config, text_lens[0], 1, device, dtype)
    t = lat.interleaved_decode(model, modes, w, args.new_tokens, device, args.repeats, progress=bar)
    timing = _timing_fields(t, modes)
    for m in modes:
        result["decode"][m] = {"n_txt": text_lens[0], "new_tokens": args.new_tokens,
                               "ms_per_token": 1000 * timing["seconds"][m], "ratio": timing["ratio"][m],
                               "ratio_iqr": timing["ratio_iqr"][m], "samples": timing["samples"][m],
                               "minor_faults": timing["minor_faults"][m]}  # fmt: skip
        with model.routing(**lat.MODE_ROUTING[m]):
            result["kv_cache_bytes"][m] = lat.kv_cache_bytes(model, w)
            result["decode"][m]["peak_bytes"] = lat.peak_memory(lambda: lat.decode(model, w, args.new_tokens), device)
    bar.close()

    if args.recompute_text_len:
        result["recompute"] = _recompute_vs_cached(model, args, device, dtype)
    if args.train_step:
        w = lat.make_workload(model.config, text_lens[0], 1, device, dtype)
        for m in ("pc", "lf"):
            for ckpt in (False, True):
                with model.routing(**lat.MODE_ROUTING[m]):
                    r = lat.train_step_seconds(model, w, ckpt, device)
                result["train_step"].append({"mode": m, "checkpointing": ckpt, **r})

    from dpvr.bench.plots import plot_bench

    write_outputs(Path(args.out), "bench", result, plot_bench, summary)
    return 0


def _recompute_vs_cached(model, args, device, dtype) -> dict:
    """LF generating args.new_tokens tokens with the routed cache vs the paper's full recompute."""
    from dpvr.bench import latency as lat

    w = lat.make_workload(model.config, args.recompute_text_len, 1, device, dtype)
    res = {}
    with model.routing(mode="lf"):
        lat.decode(model, w, 2, use_cache=True)  # warm-up
        for use_cache in (True, False):
            res["cached_s" if use_cache else "recompute_s"] = lat.timed(
                lambda: lat.decode(model, w, args.new_tokens, use_cache=use_cache), device
            )
    res.update(n_txt=args.recompute_text_len, new_tokens=args.new_tokens, speedup=res["recompute_s"] / res["cached_s"])
    return res


def _timing_fields(t: lat.Samples, modes: list[str]) -> dict:
    """Medians, the median paired ratio to vanilla and its quartiles, and the raw samples."""
    return {
        "seconds": {m: t.median(m) for m in modes},
        "ratio": {m: t.ratio(m) for m in modes},
        "ratio_iqr": {m: list(t.ratio_iqr(m)) for m in modes},
        "minor_faults": {m: t.median_faults(m) for m in modes},  # median per timed call
        "samples": t.seconds,
    }


def _flops(config, mode: str, cfg: DPVRConfig, n_img: int, n_txt: int, batch: int) -> float:
    from dpvr.bench import latency as lat

    run = cfg.with_routing(**lat.MODE_ROUTING[mode])  # exactly what the timed mode runs
    # the timed prefill asks for the last position's logits only (logits_to_keep=1, as generate does): lm_head on
    # every position would add the same FLOPs to every mode and understate each mode's analytic saving
    f = forward_flops(config, run, n_img=n_img, n_txt=n_txt, batch=batch, logits_tokens=lat.PREFILL_LOGITS)
    return float(f["total"])


def summary(result: dict) -> str:
    from dpvr.bench import latency as lat

    modes = result["modes"]
    lines = [f"device: {result['device']} ({result['dtype']}, {result['threads']} threads), preset {result['preset']}, "
             f"{result['n_img']} image tokens; CPU malloc: {result.get('cpu_malloc') or 'as the process found it'}"]  # fmt: skip
    lines.append(f"{'prefill  B  text':<18}" + "".join(f"{m:>10}" for m in modes) + "   (time ratio vs vanilla / FLOP ratio)")
    for r in result["prefill"]:
        cells = "".join(f"{r['ratio'][m]:>5.2f}/{r['flop_ratio'][m]:<4.2f}" for m in modes)
        lines.append(f"{'':<9}{r['batch']:>2} {r['n_txt']:>5}  " + cells)
    if "lf" in modes:
        shares = [(r, *lat.saving_shares(r, "lf")) for r in result["prefill"]]
        lines.append("LF prefill saving / analytic saving (quartiles of the paired ratios): " + ", ".join(
            f"B={r['batch']} text {r['n_txt']} {mid:.0%} ({lo:.0%}-{hi:.0%})" for r, mid, lo, hi in shares))  # fmt: skip
    if result["prefill"] and result["prefill"][0].get("minor_faults", {}).get("vanilla") is not None:
        lines.append("minor page faults per prefill (median): " + "; ".join(
            f"B={r['batch']} text {r['n_txt']}: " + ", ".join(f"{m} {r['minor_faults'][m]:.0f}" for m in modes)
            for r in result["prefill"]))  # fmt: skip
    v_new = result["decode"]["vanilla"]["new_tokens"]
    lines.append("cached decode ms/token (x vanilla, median paired ratio [quartiles]): " + ", ".join(
        f"{m} {d['ms_per_token']:.1f} ({d['ratio']:.2f}x [{d['ratio_iqr'][0]:.2f}, {d['ratio_iqr'][1]:.2f}])"
        for m, d in result["decode"].items()))  # fmt: skip
    kv = result["kv_cache_bytes"]
    lines.append("KV cache bytes vs vanilla: " + ", ".join(f"{m} {kv[m] / kv['vanilla']:.2f}" for m in kv))
    last = result["prefill"][-1]
    lines.append(f"peak memory vs vanilla, prefill B={last['batch']} text {last['n_txt']}: "
                 + ", ".join(f"{m} {p / last['peak_bytes']['vanilla']:.2f}" for m, p in last["peak_bytes"].items())
                 + f" (vanilla {last['peak_bytes']['vanilla'] / 2**20:.0f} MiB); generate {v_new} tokens: "
                 + ", ".join(f"{m} {d['peak_bytes'] / result['decode']['vanilla']['peak_bytes']:.2f}"
                             for m, d in result["decode"].items()))  # fmt: skip
    if "recompute" in result:
        r = result["recompute"]
        lines.append(f"LF {r['new_tokens']} new tokens: routed cache {r['cached_s']:.2f} s vs full recompute "
                     f"{r['recompute_s']:.2f} s -> {r['speedup']:.1f}x")  # fmt: skip
    for t in result["train_step"]:
        lines.append(f"train step {t['mode']} checkpointing={t['checkpointing']}: {1000 * t['seconds']:.0f} ms"
                     + f", peak {t['peak_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_outputs(out: Path, name: str, result: dict, plot, summarize) -> None:
    """OUT/NAME.json (atomically) and OUT/NAME.png, then the summary on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    plot(result, out / f"{name}.png")
    print(summarize(result))
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.png'}")


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
