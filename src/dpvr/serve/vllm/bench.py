"""Throughput of a DPVR checkpoint in vLLM's CPU engine, routed against vanilla on the same engine and
weights: the routed model's `routed` switch runs every layer on every token instead (the stock
computation), flipped between batches. Writes JSON; not a test.

    python -m dpvr.serve.vllm.bench --model runs/lf/final --out vllm-bench.json

Per repetition, after a warm-up of each, vanilla and routed run in turn (the order alternating), each on
a batch of image requests generating 1 + N tokens, timed per engine step: the first step is the prefill
(prompt tokens per second, the image encoder included), the others decode (batch x N tokens per second).
Medians over repetitions are reported, with every raw time. Images are fresh per batch and vLLM's
multimodal processor cache is off, so neither side reuses the other's preprocessing.

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

from dpvr.cli_types import at_least

SIDES = ("vanilla", "routed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dpvr.serve.vllm.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a DPVR checkpoint (lf or vtw) with its processor files; default: the tiny "
                   "LLaVA converted to LF here, with its untrained side branch")  # fmt: skip
    p.add_argument("--out", default="vllm-bench.json", help="JSON file to write")
    p.add_argument("--batch", type=at_least(1), default=8, help="image requests per batch")
    p.add_argument("--decode-tokens", type=at_least(1), default=16, help="tokens decoded after the first")
    p.add_argument("--reps", type=at_least(1), default=5, help="timed repetitions of each side")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--kv-cache-mib", type=at_least(16), default=512, help="KV cache size (vLLM's CPU default "
                   "reserves most of the machine's memory)")  # fmt: skip
    return p.parse_args(argv)


def default_checkpoint(root: Path) -> Path:
    from dpvr.loading import load_model

    out = root / "tiny-lf"
    if not (out / "config.json").exists():
        net, processor = load_model(mode="lf")
        net.save_pretrained(out)
        processor.save_pretrained(out)
    return out


def make_engine(model: Path, dtype: str, kv_cache_mib: int):
    from vllm import LLM

    # in-process engine: LLM.apply_model can then flip the model's switch with a plain function
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return LLM(model=str(model), enable_prefix_caching=False, enable_chunked_prefill=False, enforce_eager=True,
               dtype=dtype, mm_processor_cache_gb=0, seed=0, limit_mm_per_prompt={"image": 1},
               kv_cache_memory_bytes=kv_cache_mib << 20)  # fmt: skip


def requests(processor, n: int, seed: int, size: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    from dpvr.data.templates import render_prompt

    rng = np.random.default_rng(seed)
    text = render_prompt(processor, "describe the image in detail", template="chat")
    return [{"prompt": text, "multi_modal_data": {"image": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))}}
            for _ in range(n)]  # fmt: skip


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


def run(args: argparse.Namespace, llm, processor, image_size: int) -> dict:
    raw = {side: {"prefill_s": [], "decode_s": []} for side in SIDES}
    seed, tokens = 0, 0
    for rep in range(-1, args.reps):  # rep -1: warm-up, not recorded
        for side in SIDES if rep % 2 else SIDES[::-1]:
            set_routed(llm, side == "routed")
            seed += 1
            prefill, decode, tokens = timed(llm, requests(processor, args.batch, seed, image_size), args.decode_tokens)
            if rep >= 0:
                raw[side]["prefill_s"].append(prefill)
                raw[side]["decode_s"].append(decode)
    set_routed(llm, True)
    summary = {}
    for side in SIDES:
        summary[side] = {
            "prefill_tok_s": tokens / statistics.median(raw[side]["prefill_s"]),
            "decode_tok_s": args.batch * args.decode_tokens / statistics.median(raw[side]["decode_s"]),
        }
    summary["routed_over_vanilla"] = {k: summary["routed"][k] / summary["vanilla"][k] for k in summary["routed"]}
    return {"summary": summary, "raw_seconds": raw, "prompt_tokens_per_batch": tokens}


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers import AutoConfig, AutoProcessor

    import dpvr.routing.classes  # noqa: F401 (the dpvr_* configs, for AutoConfig)

    model = Path(args.model) if args.model else default_checkpoint(Path(args.out).resolve().parent / ".vllm-bench")
    config = AutoConfig.from_pretrained(model)
    llm = make_engine(model, args.dtype, args.kv_cache_mib)
    processor = AutoProcessor.from_pretrained(model)
    result = run(args, llm, processor, config.vision_config.image_size)
    result.update(model=str(model), routing=config.to_dict()["dpvr"], batch=args.batch, decode_tokens=args.decode_tokens,
                  reps=args.reps, dtype=args.dtype, machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), torch_threads=__import__("torch").get_num_threads(),
                  env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND")})  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    print(f"prefill tok/s: vanilla {s['vanilla']['prefill_tok_s']:.0f}, routed {s['routed']['prefill_tok_s']:.0f}; "
          f"decode tok/s: vanilla {s['vanilla']['decode_tok_s']:.1f}, routed {s['routed']['decode_tok_s']:.1f} "
          f"-> {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
