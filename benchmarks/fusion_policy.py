"""Task-conditioned fusion on the embedded default (issue 41 item 3): a fusion policy built from one `dpvr analyze`
run, against single placements, each LF side branch trained with the demo's recipe on the same samples.

    python3 benchmarks/fusion_policy.py [--seeds 0,1,2] [--samples 1600] [--singles all|default]
    -> docs/evidence/fusion_policy.json (every score, placement and FLOP count; rerunning skips finished runs)

Per seed: one side branch trained at each single placement (`--singles all`: every placement the policy uses;
`default`: its default only) and one trained across them (`dpvr train --fusion-policy`, a placement per step).
All are scored on the full test split: a single-placement model at its own placement; the policy model under
the policy and at each placement. Prefill FLOPs follow each question's placement (dpvr.bench.flops, one image
question of the mean test length; text-only questions run every layer on every token whatever the placement).
"""
import argparse
import json
import math
import statistics
from pathlib import Path

from dpvr.atomic import atomic_write_text
from dpvr.bench.flops import forward_flops
from dpvr.data.digit_scenes import load_split, open_benchmark
from dpvr.data.llava_json import load_samples
from dpvr.demo.recipe import BATCH, budget, training_flags
from dpvr.eval.runner import evaluate, request_of
from dpvr.fusion_policy import FusionPolicy
from dpvr.loading import load_model
from dpvr.train.cli import train

OUT = Path(__file__).resolve().parents[1] / "docs" / "evidence" / "fusion_policy.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--samples", type=int, default=1600, help="train.json samples (the demo's default)")
    p.add_argument("--singles", choices=("all", "default"), default="all")
    p.add_argument("--analysis", default=None, help="analysis.json of `dpvr analyze` (default: run it, 300 samples)")
    p.add_argument("--work", default="runs/fusion-policy", help="checkpoints and the analysis")
    p.add_argument("--data", default=None, help="digit-scenes benchmark dir (default: the seed-0 one)")
    p.add_argument("--out", default=str(OUT))
    return p.parse_args(argv)


def analysis_path(args) -> tuple[Path, int]:
    path = Path(args.analysis or Path(args.work) / "analysis" / "analysis.json")
    if not path.exists():
        from dpvr.cli import main

        assert main(["analyze", "-n", "300", "--out", str(path.parent), "--quiet", "--threads", "1"]) == 0
    return path, json.loads(path.read_text())["recommendation"]["split"]


def trained(work: Path, tag: str, seed: int, split: int, extra: list[str], data: Path, args) -> str:
    """The demo's LF recipe (dpvr.demo.recipe: one to two epochs, stopped at the held-out plateau), with a
    held-out set of 64 samples."""
    out = work / f"{tag}-s{seed}"
    if not (out / "final" / "dpvr_adapter.json").exists():
        n = len(load_samples(data / "train.json")[: args.samples])
        steps, min_steps = budget(math.ceil(n / BATCH))
        # a single placement trains from the shared-stack cache (its frozen text path is its own); the policy's
        # run cannot (its placements' text paths differ), so every run checks a smaller held-out set (64)
        # (one folder for every single placement: its files differ only in how deep the frozen path goes)
        cache = None if "--fusion_policy" in extra else str(work / "cache")
        train(["--mode", "lf", "--split_layer", str(split), "--seed", str(seed), "--max_steps", str(steps),
               "--data", str(data / "train.json"), "--output_dir", str(out), *extra,
               *training_flags(steps, min_steps=min_steps, limit=args.samples, cache=cache,
                               held_out=64)])  # fmt: skip
    return str(out / "final")


def score(adapter: str, data: Path, placement=None, policy=None) -> dict:
    model, processor = load_model(adapter=adapter)
    if placement is not None:
        with model.routing(fusion_at=placement):
            return evaluate(model, processor, data, progress=False)
    return evaluate(model, processor, data, progress=False, policy=policy)


def prefill_flops(config, split: int, placement, n_txt: int) -> int:
    return forward_flops(config, "lf", split_layer=split, fusion_at=tuple(placement), n_txt=n_txt, logits_tokens=1)["total"]


def main(argv=None) -> None:
    args = parse_args(argv)
    work, data = Path(args.work), open_benchmark(args.data, 0)
    analysis, split = analysis_path(args)
    policy = FusionPolicy.from_analysis(analysis, split)
    policy.save(work / "fusion_policy.json")
    model, processor = load_model(mode="lf", split_layer=split)
    test = [s for s in load_split(data, "test") if "image" in s]
    n_txt = round(statistics.mean(request_of(processor, s).prompt_tokens for s in test)) + 8  # + the chat template
    flops = {str(list(p)): prefill_flops(model.config, split, p, n_txt) for p in policy.placements}
    picked = [policy.pick(request_of(processor, s)) for s in test]
    record = {"policy": policy.to_dict(), "split": split, "analysis": str(analysis), "samples": args.samples,
              "prefill_flops": flops, "policy_mean_prefill_flops": statistics.mean(flops[str(list(p))] for p in picked),
              "runs": {}}  # fmt: skip
    singles = policy.placements if args.singles == "all" else (policy.default,)
    for seed in map(int, args.seeds.split(",")):
        runs = record["runs"][str(seed)] = {"single": {}, "policy_model_at": {}}
        for p in singles:
            fusion = ["--fusion_at", *map(str, p)]
            result = score(trained(work, "at-" + "-".join(map(str, p)), seed, split, fusion, data, args), data, placement=p)
            runs["single"][str(list(p))] = result["scores"]["mean"]
        across = trained(work, "policy", seed, split, ["--fusion_at", *map(str, policy.default), "--fusion_policy",
                                                        str(work / "fusion_policy.json")], data, args)  # fmt: skip
        runs["policy"] = score(across, data, policy=policy)["scores"]["mean"]
        for p in policy.placements:
            runs["policy_model_at"][str(list(p))] = score(across, data, placement=p)["scores"]["mean"]
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
        print(json.dumps(runs))


if __name__ == "__main__":
    main()
