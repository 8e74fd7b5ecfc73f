"""Where a baseline training step of the embedded default goes on this CPU: seconds per step of full
fine-tuning and LoRA (as `dpvr train` builds them), interleaved, and optionally torch's profiler table
for one of them and the sdpa kernels at the model's attention shape.

    python3 benchmarks/step_profile.py                          # full / lora16 / lora64, medians
    python3 benchmarks/step_profile.py --profile lora16         # + the top ops of three lora16 steps
    python3 benchmarks/step_profile.py --kernels                # + sdpa forward+backward by kernel and dtype

Steps: batch 16 of length-grouped train.json samples, bf16 autocast with fp32 attention (what `dpvr
train --bf16` runs on a CPU), forward, backward and AdamW, after one warm-up step. Figures measured
with it are in docs/train.md ("The v10 run").
"""
import argparse
import json
import statistics
import time

import torch
from _common import add_data_options
from cpu_step_speed import batches

from dpvr.atomic import atomic_write_text
from dpvr.attention import FP32_SDPA
from dpvr.train.args import ModelArguments
from dpvr.train.trainer import build_model

METHODS = {"full": {"method": "full"}, "lora16": {"method": "lora", "lora_r": 16}, "lora64": {"method": "lora", "lora_r": 64}}


def trainer_step(name: str, model_path: str | None = None):
    """A closure running one optimizer step of method `name` on a batch."""
    model, _ = build_model(ModelArguments(model=model_path, attn=FP32_SDPA, **METHODS[name]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def kernels(shape=(16, 6, 270, 32), repeats: int = 8) -> dict[str, float]:
    """Milliseconds of sdpa forward + backward by kernel, dtype and mask, medians after two warm-ups."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        for dtype in (torch.float32, torch.bfloat16):
            for masked in (False, True):
                q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
                mask = torch.ones(shape[2], shape[2], dtype=torch.bool).tril() if masked else None
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    with sdpa_kernel(backend):
                        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked)
                    o.sum().backward()
                    times.append(time.perf_counter() - start)
                out[f"{backend.name} {str(dtype)[6:]} {'mask' if masked else 'causal'}"] = 1000 * statistics.median(times[2:])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed steps per method (after one warm-up)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--profile", choices=list(METHODS), default=None, help="also print the profiler's top ops of this one")
    p.add_argument("--kernels", action="store_true", help="also time sdpa by kernel")
    p.add_argument("--out", default=None, help="also write the medians here as JSON")
    add_data_options(p, samples=800, batch=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = batches(args, args.steps + 1)["grouped"]
    steps = {name: trainer_step(name, args.model) for name in args.methods.split(",")}
    for step in steps.values():
        step(data[0])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for batch in data[1:]:  # interleaved: a slow minute of the machine hits every method alike
        for name, step in steps.items():
            start = time.perf_counter()
            step(batch)
            times[name].append(time.perf_counter() - start)
    result = {"seconds_per_step": {name: round(statistics.median(t), 3) for name, t in times.items()}}
    if args.kernels:
        result["sdpa_ms"] = {k: round(v, 1) for k, v in kernels().items()}
    print(json.dumps(result, indent=1))
    if args.profile:
        from torch.profiler import profile

        step = steps.get(args.profile) or trainer_step(args.profile, args.model)
        with profile() as prof:
            for batch in data[1:4]:
                step(batch)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
