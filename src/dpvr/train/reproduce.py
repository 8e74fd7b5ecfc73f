"""`dpvr reproduce`: the paper's comparisons and ablations, re-run on the embedded default.

    dpvr reproduce                 # Table 2 analogue (3 seeds for DPVR rows) + split/K/D sweeps, ~25 min on 2 cores
    dpvr reproduce --quick         # the same pipeline at toy sizes, < 5 minutes (a test runs it)

Every row trains on identical data with identical steps (`dpvr train`), then is scored with
`dpvr eval`; each run is a resumable step (its folder is reused on a rerun). Writes OUT/table.md,
OUT/results.json, OUT/loss_curves.png and OUT/sweeps.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dpvr.demo.steps import Step  # noqa: E402


@dataclass
class Row:
    name: str
    train: list[str]  # extra `dpvr train` arguments
    seeds: tuple[int, ...] = (0,)
    sweep: tuple[str, int] | None = None  # ("split", 6): a point of an ablation curve
    flops: dict = field(default_factory=dict)


def plan(quick: bool, L: int, split: int) -> list[Row]:
    seeds = (0,) if quick else (0, 1, 2)
    dpvr = lambda mode, **kw: ["--method", "dpvr", "--mode", mode, *sum(([f"--{k}", str(v)] for k, v in kw.items()), [])]  # noqa: E731
    rows = [
        Row("full fine-tune", ["--method", "full"]),
        Row("LoRA r=16", ["--method", "lora", "--lora_r", "16"]),
        Row("LoRA r=64", ["--method", "lora", "--lora_r", "64"]),
        Row("DPVR-PC", dpvr("pc", split_layer=split), seeds),
        Row("DPVR-KV", dpvr("kv", split_layer=split), seeds),
        Row("DPVR-LF", dpvr("lf", split_layer=split), seeds),
    ]
    splits = [split - 2, split + 2] if quick else [s for s in range(2, L - 1, 2) if s != split]
    rows += [Row(f"LF s={s}", dpvr("lf", split_layer=s), sweep=("split", s)) for s in splits if 1 <= s < L - 1]
    rows += [Row(f"LF K={k}", dpvr("lf", split_layer=split, fusion_layers=k), sweep=("fusion", k))
             for k in ((2,) if quick else (2, 3, 4))]  # fmt: skip
    rows += [Row(f"LF D={d}", dpvr("lf", split_layer=split, side_depth=d), sweep=("depth", d))
             for d in ((2,) if quick else (2, 3))]  # fmt: skip
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dpvr.cli_types import at_least  # 0 would read as "not given" below (`args.steps or 100`): refuse it

    p.add_argument("--quick", action="store_true", help="toy sizes: one seed, 2-point sweeps, few steps")
    p.add_argument("--model", default=None, help="base llava checkpoint (default: the embedded tiny LLaVA)")
    p.add_argument("--split-layer", type=at_least(1), default=None, help="s of the main rows (default: 18/32 of the depth)")
    p.add_argument("--steps", type=at_least(1), default=None, help="training steps per run (default 100; quick 6)")
    p.add_argument("--eval-per-family", type=at_least(1), default=None, help="questions per family (default all; quick 4)")
    p.add_argument("--out", default="runs/reproduce")


def run(args: argparse.Namespace) -> int:
    from transformers import LlavaConfig

    from dpvr.bench.flops import forward_flops
    from dpvr.loading import default_split, resolve_model_path

    base = resolve_model_path(args.model)
    config = LlavaConfig.from_pretrained(base)
    L = config.text_config.num_hidden_layers
    split = args.split_layer or default_split(L)
    steps = args.steps or (6 if args.quick else 100)
    per_family = args.eval_per_family or (4 if args.quick else None)
    out = Path(args.out)
    results = []
    for row in plan(args.quick, L, split):
        runs = []
        for seed in row.seeds:
            tag = f"{_slug(row.name)}-seed{seed}"
            train_dir = out / tag
            Step(f"train {tag}", ["train", "--model", base, *row.train, "--seed", str(seed), "--max_steps", str(steps),
                                  "--per_device_train_batch_size", "16", "--save_steps", str(10**9),
                                  "--logging_steps", "5", "--disable_tqdm", "true", "--output_dir", str(train_dir)],
                 train_dir, "reproduce").run()  # fmt: skip
            eval_dir = out / f"{tag}-eval"
            limit = [] if per_family is None else ["--limit-per-family", str(per_family)]
            Step(f"eval {tag}", ["eval", *_eval_model(row, base, train_dir), *limit, "--out", str(eval_dir)],
                 eval_dir, "reproduce").run()  # fmt: skip
            record = json.loads((train_dir / "final" / "run.json").read_text())
            scores = json.loads((eval_dir / "eval.json").read_text())["scores"]
            runs.append({"seed": seed, "scores": scores, "record": record})
        results.append(_summarise(row, runs, config, split, forward_flops))
    _write(out, results, split)
    print((out / "table.md").read_text())
    return 0


def _eval_model(row: Row, base: str, train_dir: Path) -> list[str]:
    if "--method" in row.train and row.train[row.train.index("--method") + 1] == "full":
        return ["--model", str(train_dir / "final")]
    return ["--model", base, "--adapter", str(train_dir / "final")]


def _summarise(row: Row, runs: list[dict], config, split: int, forward_flops) -> dict:
    from dpvr.eval.metrics import FAMILIES, headline

    families = [f for f in FAMILIES if f in runs[0]["scores"]]
    per = {f: [headline(f, r["scores"][f]) for r in runs] for f in families}
    per["mean"] = [r["scores"]["mean"] for r in runs]
    dpvr = runs[0]["record"].get("dpvr")
    mode = dpvr["mode"] if dpvr else "vanilla"
    n_txt = 16  # the tiny benchmark's typical prompt
    fl = forward_flops(config, mode, dpvr["split_layer"] if dpvr else split, dpvr["fusion_layers"] if dpvr else 1,
                       dpvr["side_depth"] if dpvr else 1, n_txt=n_txt)["total"]  # fmt: skip
    van = forward_flops(config, "vanilla", split, n_txt=n_txt)["total"]
    return {
        "name": row.name, "sweep": row.sweep, "seeds": [r["seed"] for r in runs],
        "mean": {k: statistics.mean(v) for k, v in per.items()},
        "std": {k: statistics.stdev(v) if len(v) > 1 else None for k, v in per.items()},
        "trainable_params": runs[0]["record"]["trainable_params"], "flop_ratio": fl / van,
        "loss_curves": [[(h["step"], h["loss"]) for h in r["record"]["log_history"] if "loss" in h] for r in runs],
    }  # fmt: skip


def _write(out: Path, results: list[dict], split: int) -> None:
    fams = [k for k in results[0]["mean"] if k != "mean"]
    lines = ["| method | " + " | ".join(fams) + " | mean | trainable | FLOPs |", "|---" * (len(fams) + 4) + "|"]
    for r in results:
        cell = lambda k: f"{r['mean'][k]:.3f}" + (f" ± {r['std'][k]:.3f}" if r["std"][k] is not None else "")  # noqa: E731
        lines.append(f"| {r['name']} | " + " | ".join(cell(f) for f in fams)
                     + f" | {cell('mean')} | {r['trainable_params']:,d} | {r['flop_ratio']:.2f} |")  # fmt: skip
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(x for x in results if x["sweep"] is None):
        for j, curve in enumerate(r["loss_curves"]):
            if curve:
                ax.plot(*zip(*curve), color=f"C{i}", alpha=1.0 if j == 0 else 0.4, label=r["name"] if j == 0 else None)
    ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.set_yscale("log"), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out / "loss_curves.png", dpi=110), plt.close(fig)
    main_lf = next(r for r in results if r["name"] == "DPVR-LF")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)  # one scale: a flat sweep looks flat
    main_setting = {"split": split, "fusion": 1, "depth": 1}  # where the main DPVR-LF row sits on each sweep
    for ax, (kind, label) in zip(axes, [("split", "split layer s"), ("fusion", "fusion layers K"),
                                        ("depth", "side depth D")]):  # fmt: skip
        pts = [(r["sweep"][1], r["mean"]["mean"]) for r in results if r["sweep"] and r["sweep"][0] == kind]
        pts.append((main_setting[kind], main_lf["mean"]["mean"]))
        ax.plot(*zip(*sorted(pts)), "o-")
        ax.set_xticks(sorted(x for x, _ in pts))
        ax.set_xlabel(label), ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean score")
    fig.tight_layout(), fig.savefig(out / "sweeps.png", dpi=110), plt.close(fig)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
