"""GPU validation in one run: routing equivalence on the device, then the 7B-shape bench and breakdown.

    python scripts/gpu_check.py --device cuda --out $OUT            # on a lent GPU machine (< 8 min)
    python scripts/gpu_check.py --device cpu --quick --out runs/gpu  # the same code paths here, ~2 min
    python scripts/gpu_check.py --stages sharded --out $OUT          # FSDP2 / FSDP1 / ZeRO-3 side-branch saves

`scripts/gpu-check.sh` is the entry point on a bare device machine (it installs the carried wheels first).
Every stage runs under its own time limit and writes what it measured even when a later stage fails;
the run's summary is OUT/gpu-check.json. Nothing here is a test of the suite: the suite never needs a GPU.

Equivalence checks reuse the suite's own tiny models and naive reference (`tests/tiny.py`,
`tests/reference.py`), moved to the device:
  - fp32: every routed mode's text logits equal the naive reference within 1e-4 (the suite's bar), for
    eager and sdpa (and flash_attention_2 when installed: it takes no explicit mask, so it is
    recorded, never gated on); cached greedy generation equals full recompute (tokens identical,
    logits within 1e-4).
  - bf16: routed bf16 logits against the fp32 reference. The tolerance is the stock model's own bf16
    error on the same weights and prompt (vanilla bf16 vs vanilla fp32), times 2: bf16 keeps 8
    mantissa bits, so any bf16 forward is ~1e-2 relative off fp32, and what routing must not do is add
    error beyond what bf16 itself costs the stock model. Both errors are recorded.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

FP32_ATOL = 1e-4  # the suite's bar against the naive reference
BF16_FACTOR = 2.0  # routed bf16 error may be at most this times the stock model's own bf16 error


def routed_configs(quick: bool):
    from dpvr import DPVRConfig

    cfgs = [
        DPVRConfig(mode="lf", split_layer=2, fusion_layers=1),
        DPVRConfig(mode="lf", split_layer=3, fusion_layers=0),
        DPVRConfig(mode="pc", split_layer=3),
        DPVRConfig(mode="kv", split_layer=3, side_depth=2),
        DPVRConfig(mode="vtw", split_layer=2),
        DPVRConfig(mode="fastv", fastv_layer=1, fastv_ratio=0.5),
    ]
    return cfgs[:3] if quick else cfgs


def cfg_id(c) -> str:
    return f"{c.mode}-s{c.split_layer}-K{c.fusion_layers}-D{c.side_depth}"


def _perturbed(cfg, backbone: str, attn: str):
    from tiny import tiny_llava

    from dpvr import convert

    model = convert(tiny_llava(backbone=backbone, attn=attn), cfg)
    if model.side_branch is not None:  # a copied side branch equals its layer: perturb it, as the suite does
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.side_branch.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _text_err(got, want, ids) -> float:
    from tiny import IMAGE_TOKEN

    text = ids != IMAGE_TOKEN
    return (got.float() - want.float())[text].abs().max().item()


@torch.no_grad()
def _logits(model, device, dtype, ids, px, mask=None):
    model = model.to(device=device, dtype=dtype)
    with torch.device(device):
        kw = dict(input_ids=ids.to(device), pixel_values=px.to(device, dtype))
        if mask is not None:
            kw["attention_mask"] = mask.to(device)
        return model(**kw).logits.cpu()


@torch.no_grad()
def _reference(model, cfg, device, ids, px, mask=None):
    from reference import reference_logits

    model = model.to(device=device, dtype=torch.float32)
    with torch.device(device):  # the reference builds its masks on the default device
        m = None if mask is None else mask.to(device)
        return reference_logits(model, model.side_branch, cfg, ids.to(device), px.to(device), m).cpu()


def check_forward(device: str, attn: str, backbone: str, cfg) -> dict:
    """fp32 and bf16 routed logits against the fp32 naive reference, one prompt with two images."""
    from tiny import pixels, prompt

    ids, px = torch.tensor([prompt(3, 7, n_images=2)]), pixels(2)
    model = _perturbed(cfg, backbone, attn)
    want = _reference(model, cfg, device, ids, px)
    row = {"attn": attn, "backbone": backbone, "config": cfg_id(cfg)}
    row["fp32_err"] = _text_err(_logits(model, device, torch.float32, ids, px), want, ids)
    row["fp32_ok"] = row["fp32_err"] <= FP32_ATOL
    if device != "cpu" or attn == "sdpa":  # bf16 on CPU is slow and says nothing about GPU kernels
        row["bf16_err"] = _text_err(_logits(model, device, torch.bfloat16, ids, px), want, ids)
        row["bf16_stock_err"] = _stock_bf16_error(backbone, attn, device, ids, px)
        row["bf16_ok"] = row["bf16_err"] <= BF16_FACTOR * row["bf16_stock_err"]
    return row


def _stock_bf16_error(backbone: str, attn: str, device: str, ids, px) -> float:
    """The stock model's own bf16 error (vanilla bf16 vs vanilla fp32) on the same weights and prompt."""
    from tiny import tiny_llava

    stock = tiny_llava(backbone=backbone, attn=attn)
    want = _logits(stock, device, torch.float32, ids, px)
    return _text_err(_logits(stock, device, torch.bfloat16, ids, px), want, ids)


@torch.no_grad()
def check_generation(device: str, attn: str, cfg, dtype: torch.dtype, n: int) -> dict:
    """Cached greedy generation against full recompute on a left-padded batch of two prompts."""
    from tiny import IMAGE_TOKEN, PAD, left_pad, pixels, prompt

    model = _perturbed(cfg, "llama", attn).to(device=device, dtype=dtype)
    model.generation_config.pad_token_id = PAD
    model.generation_config.suppress_tokens = [IMAGE_TOKEN]
    ids, mask = left_pad([prompt(2, 5, seed=1), prompt(6, 3, seed=2)])
    kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pixels(2).to(device, dtype))
    outs = [model.generate(**kw, max_new_tokens=n, do_sample=False, use_cache=c, return_dict_in_generate=True,
                           output_logits=True) for c in (True, False)]  # fmt: skip
    a, b = outs
    same = (a.sequences == b.sequences).all(0)
    first_diff = int((~same).nonzero()[0]) - ids.shape[1] if (~same).any() else n
    err = max((x.float() - y.float()).abs().max().item() for x, y in zip(a.logits, b.logits))
    row = {"attn": attn, "config": cfg_id(cfg), "dtype": str(dtype).split(".")[-1], "new_tokens": n,
           "tokens_equal": bool(same.all()), "agree_until": first_diff, "logit_err": err}  # fmt: skip
    if dtype == torch.float32:  # bf16 rounding may flip a near-tie: recorded, not gated
        row["ok"] = row["tokens_equal"] and err <= FP32_ATOL
    return row


def attention_kinds(device: str) -> list[str]:
    import importlib.util

    kinds = ["eager", "sdpa"]
    if device != "cpu" and importlib.util.find_spec("flash_attn") is not None:
        kinds.append("flash_attention_2")
    return kinds


def stage_equivalence(args, out: Path) -> dict:
    rows, gen = [], []
    backbones = ["llama"] if args.quick else ["llama", "mistral", "qwen2"]
    for attn in attention_kinds(args.device):
        for backbone in backbones:
            for cfg in routed_configs(args.quick):
                rows.append(_guard(check_forward, args.device, attn, backbone, cfg))
        for cfg in routed_configs(args.quick):
            if cfg.mode == "fastv":
                continue  # FastV ranks once with the cache and at every step without: they differ by design
            for dtype in (torch.float32, torch.bfloat16):
                gen.append(_guard(check_generation, args.device, attn, cfg, dtype, 8 if args.quick else 32))
    result = {"forward": rows, "generation": gen,
              "fp32_atol": FP32_ATOL, "bf16_factor": BF16_FACTOR,
              "all_ok": all(r.get("fp32_ok", False) and r.get("bf16_ok", True) for r in rows if r["attn"] != "flash_attention_2")
              and all(r.get("ok", True) and "error" not in r for r in gen)}  # fmt: skip
    _write(out / "equivalence.json", result)
    return {"all_ok": result["all_ok"], "forward_rows": len(rows), "generation_rows": len(gen)}


def _guard(fn, *a) -> dict:
    try:
        return fn(*a)
    except Exception as exc:  # one failing case is a finding, not the end of the run
        return {"args": [str(x) for x in a], "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}


def _dpvr(argv: list[str], limit: int, log: Path, module: str = "dpvr.cli") -> dict:
    """Run a dpvr command (`python -m module`) in a subprocess under a wall-clock limit; output to `log`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run([sys.executable, "-m", module, *argv], stdout=f, stderr=subprocess.STDOUT,
                                timeout=limit, env=env, cwd=ROOT).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"argv": [module, *argv], "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "log": log.name}


def shape_args(args) -> list[str]:
    if args.quick:
        return ["--preset", "cpu-7b-narrow" if args.device != "cpu" else "tiny", "--device", args.device,
                "--dtype", "float32"]  # fmt: skip
    return ["--preset", "llava-1.5-7b", "--device", args.device, "--dtype", "bfloat16"]


def stage_bench(args, work: Path, out: Path) -> dict:
    lens, batches = ("16", "1,2") if args.quick else ("32,64,128,256,512", "1,8")
    argv = ["bench", *shape_args(args), "--modes", "vanilla,lf,kv,vtw,fastv", "--text-lens", lens,
            "--batches", batches, "--repeats", "1" if args.quick else "5",
            "--new-tokens", "4" if args.quick else "64", "--recompute-text-len", "8" if args.quick else "64",
            "--out", str(work / "bench")]  # fmt: skip
    if args.quick:
        argv += ["--no-train-step", "--threads", "1"]
    run = _dpvr(argv, args.stage_limit, out / "bench.log")
    _copy(work / "bench" / "bench.json", out / "bench.json")
    _copy(work / "bench" / "bench.png", out / "bench.png")
    return run


def stage_bench_qwen(args, work: Path, out: Path) -> dict:
    """The non-LLaVA row: Qwen2.5-VL-7B's shape (256 image tokens: a 448x448 image), random weights."""
    if args.quick:
        return {"skipped": "a 7B shape; the dry run stays on the smallest LLaVA shapes"}
    argv = ["bench", "--preset", "qwen2.5-vl-7b", "--device", args.device, "--dtype", "bfloat16",
            "--modes", "vanilla,lf,kv,fastv", "--text-lens", "64,256", "--batches", "1,8", "--repeats", "3",
            "--new-tokens", "32", "--recompute-text-len", "64", "--no-train-step", "--out", str(work / "bench-qwen")]  # fmt: skip
    run = _dpvr(argv, args.stage_limit, out / "bench-qwen.log")
    _copy(work / "bench-qwen" / "bench.json", out / "bench-qwen.json")
    return run


def stage_vllm(args, work: Path, out: Path) -> dict:
    """vanilla vs DPVR-LF inside vLLM (dpvr.serve.vllm.bench), where this machine has vLLM. The device image
    had none when last seen, and a bare device cannot install it (no network; the carry holds 64 MiB); the
    plugin then refuses non-CPU backends in one line (docs/serving.md), which the log records."""
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed here"}
    shape = ["--preset", "cpu-7b-narrow" if args.quick else "llava-1.5-7b", "--dtype", "float32" if args.quick
             else "bfloat16", "--reps", "1" if args.quick else "5", "--kv-cache-mib", "4096"]  # fmt: skip
    run = _dpvr([*shape, "--out", str(work / "vllm" / "vllm-bench.json")], args.stage_limit, out / "vllm.log",
                module="dpvr.serve.vllm.bench")  # fmt: skip
    for suffix in (".json", ".png"):
        _copy(work / "vllm" / f"vllm-bench{suffix}", out / f"vllm-bench{suffix}")
    return run


def stage_breakdown(args, work: Path, out: Path) -> list[dict]:
    runs = []
    for batch in ("1",) if args.quick else ("1", "8"):
        argv = ["breakdown", *shape_args(args), "--modes", "lf,kv,vtw", "--text-len", "8" if args.quick else "64",
                "--batch", batch, "--repeats", "1" if args.quick else "10", "--out", str(work / f"breakdown-b{batch}")]  # fmt: skip
        if args.quick:
            argv += ["--threads", "1"]
        runs.append(_dpvr(argv, args.stage_limit, out / f"breakdown-b{batch}.log"))
        _copy(work / f"breakdown-b{batch}" / "breakdown.json", out / f"breakdown-b{batch}.json")
    return runs


def _side_branch_diff(got: Path, want: Path) -> dict:
    """Max abs difference of two saved side branches, and whether `got` loads with from_pretrained."""
    from safetensors.torch import load_file

    from dpvr import DPVRForConditionalGeneration

    a, b = load_file(got / "side_branch.safetensors"), load_file(want / "side_branch.safetensors")
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return {"same_shapes": False}
    loaded = DPVRForConditionalGeneration.from_pretrained(got)
    loads = all(torch.equal(v.cpu(), a[f"side_branch.{k}"]) for k, v in loaded.side_branch.state_dict().items())
    return {"same_shapes": True, "max_abs_diff": max((a[k].float() - b[k].float()).abs().max().item() for k in a),
            "loads": loads}  # fmt: skip


def _sharded_launches(work: Path) -> dict[str, list[str]]:
    """accelerate launch options per sharded run. One process: the machine has one GPU and NCCL takes one
    rank per GPU; a world of 1 still shards through the same code (FSDP2 DTensors, FSDP1 flat parameters,
    ZeRO-3 partitioned parameters), which is what the side-branch save must gather. (FSDP on 2 CPU
    processes, DeepSpeed ZeRO-2/3 on 2 CPU processes: tests/test_launchers.py, e2e.)"""
    zero3 = work / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                 "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))  # fmt: skip
    runs = {"fsdp2": ["--use_fsdp", "--fsdp_version", "2"],
            "fsdp1": ["--use_fsdp", "--fsdp_version", "1", "--fsdp_use_orig_params", "true"]}  # fmt: skip
    try:
        import deepspeed  # noqa: F401  (carried by scripts/gpu-wheels.sh --deepspeed)

        runs["zero3"] = ["--use_deepspeed", "--deepspeed_config_file", str(zero3), "--zero3_init_flag", "false"]
    except ImportError:
        pass
    return runs


def stage_sharded(args, work: Path, out: Path) -> dict:
    """Side-branch training under FSDP2, FSDP1 and (if installed) DeepSpeed ZeRO-3 through accelerate: the
    saved side branch equals a plain run's within fp32 tolerance and loads with from_pretrained."""
    if args.device == "cpu":
        return {"skipped": "accelerate sets FSDP and DeepSpeed up on GPUs; on CPU see tests/test_launchers.py (e2e)"}
    from dpvr.data.digit_scenes import ensure_benchmark
    from dpvr.embedded import build_tiny_model

    work = work / "sharded"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model, processor = build_tiny_model(seed=0)
    model.save_pretrained(work / "tiny")
    processor.save_pretrained(work / "tiny")
    bench = ensure_benchmark(work / "bench", seed=3, scenes={"train": 4, "val": 2, "test": 2, "existence": 2, "all": 2},
                             progress=False)  # fmt: skip
    train = ["train", "--model", str(work / "tiny"), "--data", str(bench / "train.json"), "--mode", "lf",
             "--split_layer", "6", "--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no",
             "--disable_tqdm", "true"]  # fmt: skip
    plain = _dpvr([*train, "--output_dir", str(work / "plain")], args.stage_limit, out / "sharded-plain.log")
    result = {"plain": plain}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    for name, opts in _sharded_launches(work).items():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", *opts, "-m", "dpvr.cli", *train,
               "--output_dir", str(work / name)]  # fmt: skip
        t0 = time.perf_counter()
        with open(out / f"sharded-{name}.log", "w") as f:
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=args.stage_limit, env=env,
                                    cwd=ROOT).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                rc = "timeout"
        result[name] = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
        if rc == 0 and result["plain"]["rc"] == 0:
            result[name].update(_guard(_side_branch_diff, work / name / "final", work / "plain" / "final"))
    _write(out / "sharded.json", result)
    return result


def environment(device: str) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": device}  # fmt: skip
    if device == "cuda" and torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   cuda=torch.version.cuda, gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))  # fmt: skip
    return env


def _copy(src: Path, dst: Path) -> None:
    if src.exists():
        shutil.copyfile(src, dst)


def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer configs and the smallest shapes (the CPU dry run)")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu-check"))
    p.add_argument("--stage-limit", type=int, default=240, help="seconds allowed to the bench and each breakdown")
    p.add_argument("--stages", default="equivalence,bench,breakdown",
                   help="comma-separated, from equivalence, bench, breakdown, bench-qwen (Qwen2.5-VL-7B's shape), "
                        "sharded (side-branch training under FSDP2 / FSDP1 / ZeRO-3, ~2 min), vllm (vanilla vs LF in vLLM, "
                        "where vLLM is installed)")  # fmt: skip
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda but torch sees no GPU; use --device cpu --quick for the dry run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "dpvr-gpu-check"
    summary = {"environment": environment(args.device), "quick": args.quick, "stages": {}}
    stages = {"equivalence": lambda: stage_equivalence(args, out),
              "bench": lambda: stage_bench(args, work, out),
              "breakdown": lambda: stage_breakdown(args, work, out),
              "bench-qwen": lambda: stage_bench_qwen(args, work, out),
              "sharded": lambda: stage_sharded(args, work, out),
              "vllm": lambda: stage_vllm(args, work, out)}  # fmt: skip
    for name in args.stages.split(","):
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            summary["stages"][name] = stages[name]()
        except Exception:
            summary["stages"][name] = {"error": traceback.format_exc(limit=3)}
        summary["stages"][name + "_seconds"] = round(time.perf_counter() - t0, 1)
        _write(out / "gpu-check.json", summary)  # after every stage: a later failure keeps what was measured
        print(f"[gpu_check] {name}: {summary['stages'][name]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
