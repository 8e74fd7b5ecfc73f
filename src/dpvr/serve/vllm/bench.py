"""Throughput of a DPVR checkpoint in vLLM's CPU engine, routed against vanilla on the same engine and
weights: the routed model's `routed` switch runs every layer on every token instead (the stock
computation), flipped between batches. Writes JSON; not a test.

    python -m dpvr.serve.vllm.bench --model runs/lf/final --out vllm-bench.json
    python -m dpvr.serve.vllm.bench --preset cpu-7b-narrow --out docs/evidence/vllm/cpu-7b-narrow.json

Per repetition, after a warm-up of each, vanilla and routed run in turn (the order alternating), each on
(1) a batch of image requests generating 1 + N tokens, timed per engine step: the first step is the
prefill (prompt tokens per second, the image encoder included), the others decode (batch x N tokens per
second); (2) a mixed workload submitted at once (image and text-only requests, different question
lengths and token budgets; requests per second to the last answer). Medians over repetitions are
reported, with every raw time, beside the analytic FLOP saving of the prefill step (dpvr.bench.flops)
and the share of it the measured prefill time saved. Images are fresh per batch and vLLM's multimodal
processor cache is off, so neither side reuses the other's preprocessing. A plot goes beside the JSON.

On a machine shared with other jobs, run it with OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind:
vLLM's CPU worker otherwise pins an OpenMP thread per core, whose spin-waits behind other jobs made
repeated batches vary 10x (both settings are recorded in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from dpvr.atomic import atomic_write_text
from dpvr.bench.presets import PRESETS
from dpvr.bench.vision_flops import default_image, image_tokens
from dpvr.serve.vllm.bench_models import analytic_prefill_saving, preset_lf, tiny_lf
from dpvr.cli_types import at_least

SIDES = ("vanilla", "routed")
WORDS = "describe the image in detail what digit colour shape is next to the top left cell of this grid".split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dpvr.serve.vllm.bench", description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="a DPVR checkpoint (lf or vtw) with its processor files; default: the tiny "
                       "LLaVA converted to LF here, with its untrained side branch")  # fmt: skip
    which.add_argument("--preset", choices=sorted(PRESETS), help="a random-weight LLaVA of this shape (dpvr.bench."
                       "presets), converted to LF at the default split, e.g. cpu-7b-narrow")  # fmt: skip
    p.add_argument("--out", default="vllm-bench.json", help="JSON file to write (and a .png beside it)")
    p.add_argument("--batch", type=at_least(1), default=8, help="image requests per batch")
    p.add_argument("--decode-tokens", type=at_least(1), default=16, help="tokens decoded after the first")
    p.add_argument("--mixed", type=at_least(1), default=16, help="requests in the mixed workload (half with an image)")
    p.add_argument("--reps", type=at_least(1), default=5, help="timed repetitions of each side")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--kv-cache-mib", type=at_least(16), default=512, help="KV cache size (vLLM's CPU default "
                   "reserves most of the machine's memory)")  # fmt: skip
    return p.parse_args(argv)


def make_engine(model: Path, args: argparse.Namespace, prompt_len: int):
    from vllm import LLM

    # in-process engine: LLM.apply_model can then flip the model's switch with a plain function
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # one engine step must hold the whole batch's prompts (chunked prefill is off)
    budget = max(8192, (args.batch + 1) * prompt_len, args.mixed * prompt_len)
    return LLM(model=str(model), enable_prefix_caching=False, enable_chunked_prefill=False, enforce_eager=True,
               dtype=args.dtype, mm_processor_cache_gb=0, seed=0, limit_mm_per_prompt={"image": 1},
               kv_cache_memory_bytes=args.kv_cache_mib << 20, max_num_batched_tokens=budget)  # fmt: skip


def requests(processor, n: int, seed: int, size: int, every: int = 1) -> list[dict]:
    """n requests; every `every`-th holds a fresh random image, the others are text-only; the question
    has 24 words (every=1, the prefill/decode batches) or 2-15 (the mixed workload)."""
    import numpy as np
    from PIL import Image

    from dpvr.data.templates import render_prompt

    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, size=24 if every == 1 else int(rng.integers(2, 16))))
        if i % every:
            out.append({"prompt": render_prompt(processor, words, template="chat", has_image=False)})
            continue
        pixels = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        out.append({"prompt": render_prompt(processor, words, template="chat"), "multi_modal_data": {"image": pixels}})
    return out


def timed(llm, prompts, decode_tokens: int) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds, prompt tokens) of one batch, greedy, EOS not stopping it: the
    engine's first step prefills every request (chunked prefill is off and the batch fits one step), the
    later ones decode."""
    from vllm import SamplingParams

    engine, params = llm.llm_engine, SamplingParams(temperature=0.0, max_tokens=1 + decode_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, params)  # preprocessing: not timed
    start = time.perf_counter()
    first = engine.step()
    prefilled = time.perf_counter()
    if len(first) != len(prompts) or any(len(o.outputs[0].token_ids) != 1 for o in first):
        raise RuntimeError("the batch did not prefill in one engine step: lower --batch")
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    end = time.perf_counter()
    assert len(done) == len(prompts) and all(len(o.outputs[0].token_ids) == 1 + decode_tokens for o in done)
    return prefilled - start, end - prefilled, sum(len(o.prompt_token_ids) for o in done)


def set_routed(llm, routed: bool) -> None:
    def flip(model):
        model.routed = routed

    llm.apply_model(flip)


def mixed(llm, prompts, seed: int) -> float:
    """Seconds for the mixed workload, every request submitted at once, to its last answer."""
    import numpy as np
    from vllm import SamplingParams

    budgets = np.random.default_rng(seed).integers(4, 25, len(prompts))
    params = [SamplingParams(temperature=0.0, max_tokens=int(b), ignore_eos=True) for b in budgets]
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def run(args: argparse.Namespace, llm, processor, image_size: int) -> dict:
    raw = {side: {"prefill_s": [], "decode_s": [], "mixed_s": []} for side in SIDES}
    seed, tokens = 0, 0
    for rep in range(-1, args.reps):  # rep -1: warm-up, not recorded
        for side in SIDES if rep % 2 else SIDES[::-1]:
            set_routed(llm, side == "routed")
            seed += 1
            prefill, decode, tokens = timed(llm, requests(processor, args.batch, seed, image_size), args.decode_tokens)
            whole = mixed(llm, requests(processor, args.mixed, seed, image_size, every=2), seed)
            if rep >= 0:
                for key, value in zip(raw[side], (prefill, decode, whole)):
                    raw[side][key].append(value)
    set_routed(llm, True)
    summary = {}
    for side in SIDES:
        median = {k: statistics.median(v) for k, v in raw[side].items()}
        summary[side] = {"prefill_tok_s": tokens / median["prefill_s"],
                         "decode_tok_s": args.batch * args.decode_tokens / median["decode_s"],
                         "mixed_req_s": args.mixed / median["mixed_s"]}  # fmt: skip
    summary["routed_over_vanilla"] = {k: summary["routed"][k] / summary["vanilla"][k] for k in summary["routed"]}
    # each repetition's vanilla time over its routed neighbour's: steadier than medians on a shared machine
    summary["paired_speedup_median"] = {
        rate: statistics.median(v / r for v, r in zip(raw["vanilla"][key], raw["routed"][key]))
        for rate, key in (("prefill_tok_s", "prefill_s"), ("decode_tok_s", "decode_s"), ("mixed_req_s", "mixed_s"))}
    return {"summary": summary, "raw_seconds": raw, "prompt_tokens_per_batch": tokens}


def with_analytic(result: dict, config, batch: int) -> None:
    """The prefill step's analytic FLOP saving, and the share of it the measured time saved."""
    n_img = image_tokens(config, [default_image(config)])
    n_txt = result["prompt_tokens_per_batch"] // batch - n_img
    analytic = analytic_prefill_saving(config, n_img, n_txt, batch)
    measured = 1 - 1 / result["summary"]["routed_over_vanilla"]["prefill_tok_s"]
    result["prefill_flops"] = {**analytic, "image_tokens": n_img, "text_tokens": n_txt,
                               "measured_time_saving": measured,
                               "share_of_analytic_saving": measured / analytic["saving"]}  # fmt: skip


def plot(result: dict, out: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: no backend switch in the caller's process

    ratios, flops = result["summary"]["routed_over_vanilla"], result["prefill_flops"]
    labels = {"prefill_tok_s": "prefill tokens/s", "decode_tok_s": "decode tokens/s", "mixed_req_s": "mixed requests/s"}
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    bars = ax.bar([labels[k] for k in ratios], list(ratios.values()), color=["tab:blue", "tab:orange", "tab:green"])
    ax.bar_label(bars, fmt="%.2fx")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1 / (1 - flops["saving"]), color="tab:red", ls="--", label="prefill: analytic FLOP ratio")
    ax.set_ylabel("DPVR-LF over vanilla (same engine, weights)")
    ax.set_title(f"vLLM CPU engine, {Path(result['model']).name}, batch {result['batch']}", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers import AutoConfig, AutoProcessor

    import dpvr.routing.classes  # noqa: F401 (the dpvr_* configs, for AutoConfig)

    root = Path(args.out).resolve().parent / ".vllm-bench"
    model = Path(args.model) if args.model else preset_lf(root, args.preset) if args.preset else tiny_lf(root)
    config = AutoConfig.from_pretrained(model)
    processor = AutoProcessor.from_pretrained(model)
    llm = make_engine(model, args, prompt_len=image_tokens(config, [default_image(config)]) + 64)
    result = run(args, llm, processor, config.vision_config.image_size)
    result.update(model=str(model), preset=args.preset, routing=config.to_dict()["dpvr"], batch=args.batch,
                  mixed=args.mixed, decode_tokens=args.decode_tokens, reps=args.reps, dtype=args.dtype,
                  machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                  torch_threads=__import__("torch").get_num_threads(), load_average=os.getloadavg(),
                  env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND")})  # fmt: skip
    with_analytic(result, config, args.batch)
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    s, f = result["summary"], result["prefill_flops"]
    print(f"routed over vanilla: prefill {s['routed_over_vanilla']['prefill_tok_s']:.2f}x (analytic "
          f"{1 / (1 - f['saving']):.2f}x; {100 * f['share_of_analytic_saving']:.0f}% of the FLOP saving), decode "
          f"{s['routed_over_vanilla']['decode_tok_s']:.2f}x, mixed requests/s {s['routed_over_vanilla']['mixed_req_s']:.2f}x "
          f"-> {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
