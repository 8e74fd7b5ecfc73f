"""`dpvr demo`: the whole idea on the embedded default, in minutes on a laptop CPU.

    dpvr demo                     # -> runs/demo/report.html and a summary table
    dpvr demo --train-steps 100   # exactly 100 side-branch training steps instead of the recipe

1. analyze the tiny LLaVA's visual saturation and pick the split (`dpvr analyze`);
2. convert to DPVR-LF at that split and train the side branch with the reproduction's recipe (`dpvr train`:
   at least one epoch, then on to the held-out loss's plateau, from the shared-stack cache; dpvr.demo.recipe);
3. evaluate vanilla, FastV, VTW and DPVR-LF side by side (`dpvr eval`);
4. benchmark prefill and cached decode for the same modes (`dpvr bench --preset tiny`);
5. write a summary table and a self-contained HTML report with the plots.
Each step is a dpvr command run in-process into its own folder, reused on a rerun (see steps.py).
"""
from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from dpvr.cli_types import at_least
from dpvr.demo.recipe import CACHE_FOLDER, HELD_OUT_LIMIT, budget, epoch_steps, training_flags
from dpvr.demo.steps import Step, model_fingerprint

METHODS = ("vanilla", "fastv", "vtw", "lf")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (steps inside it are reused on reruns)")
    p.add_argument("--model", default=None, help="stock llava checkpoint (default: the embedded tiny LLaVA)")
    p.add_argument("--analyze-samples", type=at_least(1), default=64)
    p.add_argument("--train-steps", type=at_least(1), default=None,
                   help="exactly this many side-branch training steps (default: the recipe, one epoch and on to the "
                        "held-out plateau)")
    p.add_argument("--held-out", type=at_least(1), default=HELD_OUT_LIMIT, help="val samples in the held-out loss")
    p.add_argument("--eval-per-family", type=at_least(1), default=60, help="questions per family (None: all)")
    p.add_argument("--fresh", action="store_true", help="rerun every step even if its results exist")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from dpvr.loading import resolve_model_path

    out = Path(args.out)
    model = [] if args.model is None else ["--model", args.model]
    base = resolve_model_path(args.model)
    new_step = partial(Step, model=model_fingerprint(base))  # every step reads this checkpoint
    analyze = new_step("analyze", ["analyze", *model, "--out", str(out / "analyze"), "-n", str(args.analyze_samples),
                                   "--batch-size", "8"], out / "analyze")  # fmt: skip
    analyze.run(args.fresh)
    rec = json.loads((out / "analyze" / "analysis.json").read_text())["recommendation"]
    split = int(rec["split"])
    print(f"[demo] recommended split_layer = {split}: {rec['reason']}", flush=True)

    if args.train_steps:  # a short budget: every step trains, and a cache would cost more than it saves
        steps, recipe = args.train_steps, training_flags(args.train_steps, held_out=args.held_out, min_steps=args.train_steps)
    else:  # the reproduction's recipe
        steps, min_steps = budget(epoch_steps())
        recipe = training_flags(steps, held_out=args.held_out, min_steps=min_steps, cache=str(out / CACHE_FOLDER))
    train = new_step("train", ["train", *model, "--mode", "lf", "--split_layer", str(split), "--max_steps", str(steps),
                               *recipe, "--output_dir", str(out / "train")], out / "train")  # fmt: skip
    train.run(args.fresh)
    adapter = out / "train" / "final"

    limit = [] if args.eval_per_family is None else ["--limit-per-family", str(args.eval_per_family)]
    routing = {"vanilla": [], "fastv": ["--mode", "fastv"], "vtw": ["--mode", "vtw", "--split-layer", str(split)],
               "lf": ["--adapter", str(adapter)]}  # fmt: skip
    evals = {}
    for name in METHODS:
        step = new_step(f"eval {name}", ["eval", *model, *routing[name], *limit, "--out", str(out / f"eval-{name}")],
                        out / f"eval-{name}", reads=(adapter,) if name == "lf" else ())  # fmt: skip
        step.run(args.fresh)
        evals[name] = json.loads((out / f"eval-{name}" / "eval.json").read_text())

    bench = new_step("bench", ["bench", "--preset", base, "--split-layer", str(split), "--modes", ",".join(METHODS),
                               "--text-lens", "16,32,64,128", "--batches", "1", "--repeats", "3", "--new-tokens", "16",
                               "--recompute-text-len", "16", "--no-train-step", "--out", str(out / "bench")],
                     out / "bench")  # fmt: skip
    bench.run(args.fresh)
    bench_result = json.loads((out / "bench" / "bench.json").read_text())

    from dpvr.demo.summary import build_report, summary_rows, summary_text

    rows = summary_rows(evals, bench_result, split, out / "train" / "final" / "run.json")
    print(summary_text(rows, evals))
    report = build_report(out, rows, evals, bench_result, rec)
    print(f"[demo] report: {report}")
    return 0
