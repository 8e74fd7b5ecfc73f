"""The reproduction's outputs: per-row summaries (mean ± std over seeds, convergence, cost), table.md,
claims.md, results.json and the plots (held-out loss curves, the three sweeps, Table 8)."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from matplotlib.figure import Figure  # not pyplot: no backend switch for the user's process, no global registry

from dpvr.atomic import atomic_write_text
from dpvr.demo.reproduce.claims import verdicts
from dpvr.train.plateau import held_out_curve, plateau


def summarise(results: dict, ratios: dict, lrs: dict) -> dict[str, dict]:
    from dpvr.eval.metrics import FAMILIES, headline

    out = {}
    for name, res in results.items():
        row, runs = res["row"], res["runs"]
        families = [f for f in FAMILIES if f in runs[0]["scores"]]
        per = {f: [headline(f, r["scores"][f]) for r in runs] for f in families}
        per["mean"] = [r["scores"]["mean"] for r in runs]
        pope = runs[0]["scores"].get("pope", {}).get("subsets", {})
        curves = [held_out_curve(r["record"]["log_history"]) if r["record"] else [] for r in runs]
        conv = [plateau(c) for c in curves] if row.trains else []
        out[name] = {
            "name": name, "sweep": row.sweep, "routing": row.routing, "seeds": [r["seed"] for r in runs],
            "mean": {k: statistics.mean(v) for k, v in per.items()},
            "std": {k: statistics.stdev(v) if len(v) > 1 else None for k, v in per.items()},
            "pope_f1_subsets": {k: statistics.mean(r["scores"]["pope"]["subsets"][k]["f1"] for r in runs) for k in pope},
            "trainable_params": runs[0]["record"]["trainable_params"] if row.trains else 0,
            "learning_rate": lrs[row.family]["chosen"] if row.trains else None,
            "converged": all(c["plateaued"] for c in conv) if row.trains else None, "convergence": conv,
            "steps": [r["record"]["steps"] for r in runs] if row.trains else None,
            "held_out_curves": curves,
            **{k: v for k, v in ratios[name].items()},
        }  # fmt: skip
    for name, res in results.items():  # a row run on another row's side branch is as converged as that row
        if src := res["row"].adapter_of:
            out[name].update({k: out[src][k] for k in ("converged", "trainable_params", "learning_rate", "steps")})
    return out


def _cell(s: dict, k: str) -> str:
    std = s["std"][k]
    return f"{s['mean'][k]:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def table(summaries: dict) -> str:
    fams = [k for k in next(iter(summaries.values()))["mean"] if k != "mean"]
    head = ["method", *fams, "mean", "seeds", "trainable", "FLOPs", "time", "LR", "steps", "converged"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for s in summaries.values():
        conv = {True: "yes", False: "**still falling**", None: "—"}[s["converged"]]
        lr = f"{s['learning_rate']:g}" if s["learning_rate"] else "—"
        steps = "/".join(map(str, s["steps"])) if s["steps"] else "—"
        seeds = "—" if s["seeds"] == [None] else str(len(s["seeds"]))
        lines.append(f"| {s['name']} | " + " | ".join(_cell(s, f) for f in fams)
                     + f" | {_cell(s, 'mean')} | {seeds} | {s['trainable_params']:,d} | {s['flop_ratio']:.2f} | {s['time_ratio']:.2f}"
                     f" | {lr} | {steps} | {conv} |")  # fmt: skip
    lines.append("\npope: F1 (yes positive); mme: accuracy+; mmbench: circular accuracy; others: accuracy. FLOPs and "
                 "time: analytic prefill FLOPs and measured prefill time against vanilla (batch 1, median of paired "
                 "rounds; full fine-tune and LoRA run the stock forward). steps: where each seed's run ended (at its "
                 "held-out plateau, or at the budget).")  # fmt: skip
    return "\n".join(lines) + "\n"


def lr_table(lrs: dict) -> str:
    """Each family's sweep: the held-out loss of every candidate, the pick, and whether it is still at an edge."""
    lines = ["| family | held-out loss by learning rate | pick |", "|---|---|---|"]
    for family, v in lrs.items():
        cells = ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in v["losses"].items())
        edge = " (**at the edge**: a better one may lie beyond)" if v.get("at_edge") else ""
        lines.append(f"| {family} ({v['row']}) | {cells} | {v['chosen']:g}{edge} |")
    return "\n".join(lines) + "\n"


def table8(prefill: list[dict]) -> str:
    """The paper's Table 8 analogue: prefill cost against vanilla by text length, at the main split."""
    if not prefill:
        return "(not measured: the main DPVR-LF row was not run)\n"
    modes = [m for m in prefill[0]["ratio"] if m != "vanilla"]
    head = ["text tokens", *(f"{m} FLOPs" for m in modes), *(f"{m} time" for m in modes)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in sorted(prefill, key=lambda r: r["n_txt"]):
        cells = [f"{r['flop_ratio'][m]:.2f}" for m in modes] + [f"{r['ratio'][m]:.2f}" for m in modes]
        lines.append(f"| {r['n_txt']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nAnalytic prefill FLOPs and measured prefill time against vanilla, batch 1.\n"


def time_table(minutes: dict[str, float], calls: list[dict]) -> str:
    """Minutes per stage (analysis, LR sweep, each row with all its seeds, bench), summed from the steps'
    own records (a step reused from an earlier, interrupted call counts what it took then), and the
    wall-clock of the calls that ran them (OUT/calls.json)."""
    lines = ["| stage | minutes |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in minutes.items()]
    lines.append(f"| **all steps** | **{sum(minutes.values()):.1f}** |")
    wall = sum(c["minutes"] for c in calls)
    jobs = sorted({c["jobs"] for c in calls})
    return "\n".join(lines) + (
        "\n\nWall-clock seconds of each step when it ran: on a machine shared with other work they count the slower "
        "time, and runs side by side (--jobs) each count their own, so with more than one job the steps sum past "
        f"the wall-clock.\n\n**Wall-clock of the command: {wall:.1f} min** over {len(calls)} call(s) that ran steps "
        f"(--jobs {', '.join(map(str, jobs)) or '-'}; OUT/calls.json).\n")


def claims_markdown(claims: list[dict]) -> str:
    lines = ["| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {c['claim']} | **{c['verdict']}** | {c['evidence']} |" for c in claims]
    return "\n".join(lines) + "\n"


def write_report(out: Path, summaries: dict, split: int, lrs: dict, zero_grad: dict, analysis: dict, log: list[str],
                 prefill: list[dict], minutes: dict[str, float], calls: list[dict]) -> None:  # fmt: skip
    """prefill: the main split's `dpvr bench` rows over text lengths (Table 8); minutes: per stage; calls:
    the wall-clock of each call that ran steps."""
    claims = verdicts(summaries, zero_grad)
    atomic_write_text(out / "table.md", table(summaries) + "\n## Learning-rate sweep (seed 0, the same steps each)\n\n"
                      + lr_table(lrs) + "\n## Prefill cost by text length (Table 8)\n\n" + table8(prefill)
                      + "\n## Where the time went\n\n" + time_table(minutes, calls))  # fmt: skip
    atomic_write_text(out / "claims.md", claims_markdown(claims))
    record = {"split": split, "lr_sweep": {f: {**v, "losses": {str(k): x for k, x in v["losses"].items()}}
                                           for f, v in lrs.items()},
              "side_branch_gradient": zero_grad, "claims": claims, "rows": list(summaries.values()),
              "recommendation": analysis.get("recommendation"), "table8": prefill, "minutes": minutes, "calls": calls,
              "commands": log}  # fmt: skip
    atomic_write_text(out / "results.json", json.dumps(record, indent=1, default=str) + "\n")
    _plot_curves(out, summaries)
    _plot_sweeps(out, summaries, split)
    figure = next(iter(sorted((out / "analyze").glob("*.png"))), None)
    if figure is not None:  # Figure 2 analogue, beside the tables
        shutil.copyfile(figure, out / "saturation.png")


def _plot_curves(out: Path, summaries: dict) -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for i, s in enumerate(x for x in summaries.values() if x["sweep"] is None and x["held_out_curves"]
                          and any(x["held_out_curves"])):  # fmt: skip
        for j, curve in enumerate(s["held_out_curves"]):
            if curve:
                ax.plot(*zip(*curve), color=f"C{i}", alpha=1.0 if j == 0 else 0.4, label=s["name"] if j == 0 else None)
    ax.set_xlabel("step"), ax.set_ylabel("held-out (val) loss"), ax.set_yscale("log"), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out / "loss_curves.png", dpi=110)


def _plot_sweeps(out: Path, summaries: dict, split: int) -> None:
    main = summaries.get("DPVR-LF")
    if main is None:  # a run cut short before its main row: nothing to place the sweeps against
        return
    fig = Figure(figsize=(12, 3.5))
    axes = fig.subplots(1, 3, sharey=True)  # one scale: a flat sweep looks flat
    at = {"split": split, "fusion": 1, "depth": 1}  # where the main DPVR-LF row sits on each sweep
    for ax, (kind, label) in zip(axes, [("split", "split layer s"), ("fusion", "fusion layers K"),
                                        ("depth", "side depth D")]):  # fmt: skip
        pts = [(s["sweep"][1], s["mean"]["mean"], s["std"]["mean"] or 0.0) for s in summaries.values()
               if s["sweep"] and s["sweep"][0] == kind] + [(at[kind], main["mean"]["mean"], main["std"]["mean"] or 0.0)]  # fmt: skip
        xs, ys, es = zip(*sorted(pts))
        ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=3)
        ax.set_xticks(xs), ax.set_xlabel(label), ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean score (± std over seeds)")
    fig.tight_layout(), fig.savefig(out / "sweeps.png", dpi=110)
