"""`dpvr demo`: the whole idea on the embedded default, in minutes on a laptop CPU.

    dpvr demo                     # -> runs/demo/report.html and a summary table
    dpvr demo --train-steps 100   # exactly 100 side-branch training steps instead of the recipe

1. analyze the tiny LLaVA's visual saturation: the split and where to fuse (`dpvr analyze`);
2. train DPVR-LF's side branch twice with the reproduction's recipe on the first 1,600 training samples
   (`dpvr train`: at least one epoch, then on to the held-out loss's plateau, from one shared-stack cache;
   dpvr.demo.recipe): at the paper's default (K = 1, the last layer) and fused where the analysis says text
   still reads the image (`fusion_at`);
3. evaluate vanilla, FastV, VTW and both LF side by side (`dpvr eval`);
4. benchmark prefill and cached decode for the same routings (`dpvr bench --preset <the model>`);
5. a summary table, which method is best at which cost (said from the numbers), and a static HTML report
   whose first figure is accuracy against prefill cost.
Each step is a dpvr command run in-process into its own folder, reused on a rerun (see steps.py).
`dpvr eval --from OUT` and `dpvr generate --from OUT` then run the recommended routing (dpvr.recommended).
"""
from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from dpvr.cli_types import at_least
from dpvr.demo.recipe import CACHE_FOLDER, HELD_OUT_LIMIT, budget, epoch_steps, training_flags
from dpvr.demo.steps import Step, model_fingerprint
from dpvr.demo.summary import Method

BASELINES = ("vanilla", "fastv", "vtw")
# the demo's training set, the first N of train.json: the shared-stack fill and both LF runs scale with it (on all
# 6,189 samples they were most of the demo's time; the README's demo section gives the time it takes now)
TRAIN_SAMPLES = 1600  # 100 steps an epoch at batch 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (steps inside it are reused on reruns)")
    p.add_argument("--model", default=None, help="stock llava checkpoint (default: the embedded tiny LLaVA)")
    p.add_argument("--analyze-samples", type=at_least(1), default=200,
                   help="samples `dpvr analyze` reads (200, as `dpvr reproduce`: fewer leave the masking curve too noisy "
                        "to place the fusion layers)")
    p.add_argument("--train-steps", type=at_least(1), default=None,
                   help="exactly this many side-branch training steps (default: the recipe, one epoch and on to the "
                        "held-out plateau)")
    p.add_argument("--train-samples", type=at_least(1), default=TRAIN_SAMPLES,
                   help="train on the first N samples of train.json (shuffled; the reproduction trains on all 6,189): "
                        "what keeps the demo within minutes")
    p.add_argument("--held-out", type=at_least(1), default=HELD_OUT_LIMIT, help="val samples in the held-out loss")
    p.add_argument("--eval-per-family", type=at_least(1), default=50, help="questions per family (None: all)")
    p.add_argument("--fresh", action="store_true", help="rerun every step even if its results exist")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def lf_variants(rec, num_layers: int) -> dict:
    """{method key: DPVRConfig}: LF at the paper's K = 1, and (when it differs) at the analysis's placement."""
    from dpvr.config import DPVRConfig
    from dpvr.recommended import routing, same_routing

    paper = DPVRConfig(mode="lf", split_layer=rec.split, fusion_layers=1)
    chosen = routing(rec)
    chosen.validate_for(num_layers)
    return {"lf": paper} if same_routing(chosen, paper) else {"lf": paper, "lf-at": chosen}


def train_flags(args: argparse.Namespace, out: Path) -> tuple[int, list[str]]:
    """(the step cap, `dpvr train` flags after it) of every LF run."""
    if args.train_steps:  # a short budget: every step trains, and a cache would cost more than it saves
        return args.train_steps, training_flags(args.train_steps, held_out=args.held_out, min_steps=args.train_steps,
                                                limit=args.train_samples)  # fmt: skip
    steps, min_steps = budget(epoch_steps(limit=args.train_samples))  # the reproduction's recipe, on the demo's samples
    return steps, training_flags(steps, held_out=args.held_out, min_steps=min_steps, cache=str(out / CACHE_FOLDER),
                                 limit=args.train_samples)  # fmt: skip


def routing_flags(cfg, style: str) -> list[str]:
    """The split and fusion of an LF config as `dpvr train` (underscores) or `dpvr bench` flags."""
    if style == "train":
        fusion = ["--fusion_at", *map(str, cfg.fusion_at)] if cfg.fusion_at else ["--fusion_layers", str(cfg.fusion_layers)]
        return ["--split_layer", str(cfg.split_layer), *fusion]
    return cfg.to_argv(["split_layer", "fusion_at" if cfg.fusion_at else "fusion_layers"])


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from dpvr.loading import resolve_model_path
    from dpvr.recommended import read_analysis, read_recommendation

    out = Path(args.out)
    model = [] if args.model is None else ["--model", args.model]
    base = resolve_model_path(args.model)
    step = partial(Step, model=model_fingerprint(base))  # every step reads this checkpoint
    step("analyze", ["analyze", *model, "--out", str(out / "analyze"), "-n", str(args.analyze_samples),
                     "--batch-size", "8"], out / "analyze").run(args.fresh)  # fmt: skip
    rec = read_recommendation(out)
    print(f"[demo] recommended split_layer = {rec.split}: {rec.reason}\n[demo] {rec.fusion_reason}", flush=True)
    variants = lf_variants(rec, read_analysis(out)["curves"]["num_layers"])

    cap, recipe = train_flags(args, out)
    for key, cfg in variants.items():
        folder = out / ("train" if key == "lf" else f"train-{key.removeprefix('lf-')}")
        step(f"train {key}", ["train", *model, "--mode", "lf", *routing_flags(cfg, "train"), "--max_steps", str(cap),
                              *recipe, "--output_dir", str(folder)], folder).run(args.fresh)  # fmt: skip
    methods = [Method.baseline(k, rec.split, out) for k in BASELINES]
    methods += [Method.lf(k, cfg, out, "train" if k == "lf" else f"train-{k.removeprefix('lf-')}") for k, cfg in variants.items()]

    limit = [] if args.eval_per_family is None else ["--limit-per-family", str(args.eval_per_family)]
    for m in methods:
        step(f"eval {m.key}", ["eval", *model, *m.eval_flags, *limit, "--out", str(m.eval_dir)], m.eval_dir,
             reads=(m.adapter,) if m.adapter else ()).run(args.fresh)  # fmt: skip

    bench = ["bench", "--preset", base, "--batches", "1", "--repeats", "3", "--new-tokens", "16", "--no-train-step"]
    step("bench", [*bench, *routing_flags(variants["lf"], "bench"), "--modes", "vanilla,fastv,vtw,lf",
                   "--text-lens", "16,32,64,128", "--recompute-text-len", "16", "--out", str(out / "bench")],
         out / "bench").run(args.fresh)  # fmt: skip
    for m in methods:
        if m.bench_dir != out / "bench":  # LF at the analysis's placement: a bench of its own, against vanilla
            step(f"bench {m.key}", [*bench, *routing_flags(m.config, "bench"), "--modes", "vanilla,lf", "--text-lens", "16",
                                    "--recompute-text-len", "0", "--out", str(m.bench_dir)], m.bench_dir).run(args.fresh)  # fmt: skip

    from dpvr.demo.page import build_report
    from dpvr.demo.summary import summary_rows, summary_text, verdicts

    rows = summary_rows(methods)
    print(summary_text(rows))
    print("\n".join(verdicts(rows)))
    print(f"[demo] report: {build_report(out, rows, rec)}")
    return 0
