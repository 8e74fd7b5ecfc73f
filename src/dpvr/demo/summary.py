"""The demo's summary: one row per method (its configuration, accuracy, trainable parameters, FLOPs and
measured latency against vanilla), the accuracy-cost front, and the sentences that say what wins at
what cost, made from the rows as the table shows them (means to 3 decimals, cost ratios to 2)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dpvr.config import DPVRConfig
from dpvr.eval.metrics import FAMILIES, headline

COSTS = {"flop_ratio": "analytic prefill FLOPs", "prefill_ratio": "measured prefill time"}


@dataclass(frozen=True)
class Method:
    key: str  # vanilla, fastv, vtw, lf, lf-at
    name: str  # as the table and the sentences write it
    configuration: str
    eval_flags: tuple[str, ...]
    eval_dir: Path
    bench_dir: Path
    bench_mode: str
    config: DPVRConfig | None = None
    adapter: Path | None = None  # the trained side branch (LF)

    @classmethod
    def baseline(cls, key: str, split: int, out: Path) -> "Method":
        fastv = DPVRConfig(mode="fastv")
        name, configuration, flags = {
            "vanilla": ("vanilla", "every token through every layer", ()),
            "fastv": ("FastV", f"drops {fastv.fastv_ratio:.0%} of the image tokens after layer {fastv.fastv_layer}",
                      ("--mode", "fastv")),
            "vtw": ("VTW", f"image tokens withdrawn from layer {split} on (s={split})",
                    ("--mode", "vtw", "--split-layer", str(split))),
        }[key]  # fmt: skip
        return cls(key, name, configuration, flags, out / f"eval-{key}", out / "bench", key)

    @classmethod
    def lf(cls, key: str, cfg: DPVRConfig, out: Path, train_folder: str) -> "Method":
        adapter = out / train_folder / "final"
        run = adapter / "run.json"
        record = json.loads(run.read_text()) if run.exists() else {}
        if cfg.fusion_at:
            at = ",".join(map(str, cfg.fusion_at))
            name, fusion = f"DPVR-LF at {at}", f"fused at layers {at} (dpvr analyze)"
        else:
            name, fusion = f"DPVR-LF K={cfg.fusion_layers}", f"K={cfg.fusion_layers} (the paper's)"
        samples = f" on {record['train_samples']:,} samples" if "train_samples" in record else ""
        configuration = f"s={cfg.split_layer}, {fusion}, D={cfg.side_depth}, {record.get('steps')} training steps{samples}"
        bench = out / "bench" if key == "lf" else out / f"bench-{key.removeprefix('lf-')}"
        return cls(key, name, configuration, ("--adapter", str(adapter)), out / f"eval-{key}", bench, "lf", cfg, adapter)


def summary_rows(methods: list[Method]) -> list[dict]:
    rows, replies = [], {}
    for m in methods:
        result = json.loads((m.eval_dir / "eval.json").read_text())
        scores, replies[m.name] = result["scores"], result["replies"]
        bench = json.loads((m.bench_dir / "bench.json").read_text())
        short = min(bench["prefill"], key=lambda r: (r["batch"], r["n_txt"]))  # the tiny model's prompt length
        trained = json.loads((m.adapter / "run.json").read_text())["trainable_params"] if m.adapter else 0
        rows.append({
            "method": m.name, "configuration": m.configuration, "mean": scores["mean"],
            "families": {f: headline(f, scores[f]) for f in FAMILIES if f in scores},
            "pope_subsets": scores.get("pope", {}).get("subsets", {}), "trainable": trained,
            "flop_ratio": short["flop_ratio"][m.bench_mode], "prefill_ratio": short["ratio"][m.bench_mode],
            "decode_ratio": bench["decode"][m.bench_mode]["ratio"], "n_txt": short["n_txt"], "n_img": bench["n_img"],
            "run_json": m.adapter / "run.json" if m.adapter else None,
        })  # fmt: skip
    return with_noise(rows, replies)


def with_noise(rows: list[dict], replies: dict[str, dict[str, str]]) -> list[dict]:
    """Each row's mean minus vanilla's and its paired-bootstrap standard error (dpvr.demo.noise)."""
    from dpvr.data.digit_scenes import load_split, open_benchmark
    from dpvr.demo.noise import paired_se

    asked = set(replies["vanilla"])
    samples = [s for s in load_split(open_benchmark(None, 0), "test") if s["id"] in asked]
    se = paired_se(samples, replies, "vanilla")
    base = next(r["mean"] for r in rows if r["method"] == "vanilla")
    return [{**r, "vs_vanilla": r["mean"] - base, "vs_vanilla_se": se[r["method"]]} for r in rows]


def shown(row: dict, key: str) -> float:
    """A number as the table shows it: means to 3 decimals, ratios to 2."""
    return round(row[key], 3 if key == "mean" else 2)


def front(rows: list[dict], cost: str) -> list[dict]:
    """The accuracy-cost front: from the cheapest up, each row whose mean beats every row that costs no more
    (so, for any cost c, the last of them at or below c is the most accurate method there; ties go to the cheaper)."""
    best, out = float("-inf"), []
    for r in sorted(rows, key=lambda r: (shown(r, cost), -shown(r, "mean"))):
        if shown(r, "mean") > best:
            out.append(r)
            best = shown(r, "mean")
    return out


def verdict(rows: list[dict], cost: str) -> str:
    """One sentence: the most accurate method up to each cost on the front, and which methods are beaten."""
    top = front(rows, cost)
    tiers = [f"up to {shown(r, cost):.2f}x {r['method']} (mean {shown(r, 'mean'):.3f})" for r in top]
    listed = tiers[0] if len(tiers) == 1 else ", ".join(tiers[:-1]) + ", and " + tiers[-1]
    beaten = [r["method"] for r in rows if not any(r is t for t in top)]
    tail = "" if not beaten else (f"; {_and(beaten)} {'is' if len(beaten) == 1 else 'are'} beaten by a method "
                                  "that costs no more")  # fmt: skip
    return f"By {COSTS[cost]} against vanilla's, the most accurate method is: {listed}{tail}."


def noise(rows: list[dict]) -> str:
    """One sentence: which methods' means this run cannot tell apart from vanilla's (within two paired
    standard errors), and which differ by more."""
    others = [r for r in rows if r["method"] != "vanilla"]
    near = [r for r in others if abs(r["vs_vanilla"]) <= 2 * r["vs_vanilla_se"]]
    far = [r for r in others if not any(r is n for n in near)]
    said = [f"{_and([_signed(r) for r in near])} {'is' if len(near) == 1 else 'are'} within two standard errors of "
            "vanilla's mean (not told apart from it at this many questions)"] if near else []  # fmt: skip
    said += [f"{_and([_signed(r) for r in far])} {'differs' if len(far) == 1 else 'differ'} from it by more"] if far else []
    return f"By a paired bootstrap over the questions, {'; '.join(said)}."


def _signed(row: dict) -> str:
    return f"{row['method']} ({row['vs_vanilla']:+.3f} ± {row['vs_vanilla_se']:.3f})"


def verdicts(rows: list[dict]) -> list[str]:
    """What wins at what cost, by FLOPs and by measured time; then what of it is noise."""
    return [*(verdict(rows, cost) for cost in COSTS), noise(rows)]


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def versus(row: dict) -> str:
    """Mean minus vanilla's with its paired standard error, e.g. "-0.009 +- 0.012"; a dash for vanilla itself."""
    return "-" if row["method"] == "vanilla" else f"{row['vs_vanilla']:+.3f} +- {row['vs_vanilla_se']:.3f}"


def summary_text(rows: list[dict]) -> str:
    fams = list(rows[0]["families"])
    w = max(len(r["method"]) for r in rows) + 2
    head = f"{'method':<{w}}{'mean':>6}{'vs vanilla':>17}" + "".join(f"{f[:8]:>9}" for f in fams)
    head += f"{'trainable':>11}{'FLOPs':>7}{'prefill':>8}{'decode':>8}  configuration"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r['families'][f]:>9.3f}" for f in fams)
        lines.append(f"{r['method']:<{w}}{r['mean']:>6.3f}{versus(r):>17}{cells}{r['trainable']:>11,d}{r['flop_ratio']:>7.2f}"
                     f"{r['prefill_ratio']:>8.2f}{r['decode_ratio']:>8.2f}  {r['configuration']}")  # fmt: skip
    lines.append("accuracy: POPE F1, MME acc+, MMBench circular, else exact match; mean: over the image families\n"
                 "vs vanilla: mean minus vanilla's, +- its paired-bootstrap standard error over the questions\n"
                 f"FLOPs/prefill/decode: ratio to vanilla (analytic prefill FLOPs; measured prefill time and cached decode ms/token "
                 f"at {rows[0]['n_txt']} text + {rows[0]['n_img']} image tokens, batch 1)")  # fmt: skip
    return "\n".join(lines)
