"""Plots for `dpvr bench`: prefill time ratio vs text length (with the FLOP ratio), decode, KV bytes, peak memory,
and LF's measured prefill saving as a share of its analytic one."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # not pyplot: no backend switch for the user's process, no global registry

from dpvr.bench.latency import saving_shares

def plot_bench(result: dict, path: Path) -> None:
    """Two rows of three panels: prefill, decode and KV cache; peak memory, LF's saving share and the settings."""
    modes = result["modes"]
    colors = {m: f"C{i}" for i, m in enumerate(modes)}
    fig = Figure(figsize=(16, 9.5))
    axes = fig.subplots(2, 3)
    _plot_prefill(axes[0, 0], result, colors)
    dec = result["decode"]
    ax = axes[0, 1]
    ax.bar(list(dec), [d["ms_per_token"] for d in dec.values()], color=[colors[m] for m in dec])
    ax.set_ylabel("ms / token")
    ax.set_title(f"cached decode, {next(iter(dec.values()))['new_tokens']} new tokens")
    kv = result["kv_cache_bytes"]
    ax = axes[0, 2]
    ax.bar(list(kv), [kv[m] / kv["vanilla"] for m in kv], color=[colors[m] for m in kv])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("KV-cache bytes / vanilla")
    ax.set_title("KV cache after prefill")
    _plot_peak_memory(axes[1, 0], result)
    _plot_lf_share(axes[1, 1], result)
    _settings(axes[1, 2], result)
    for ax in axes.flat:
        ax.tick_params(axis="x", labelsize=9)
    preset = Path(result["preset"]).name if Path(result["preset"]).is_dir() else result["preset"]  # no machine path
    fig.suptitle(f"dpvr bench: {preset} on {result['device']} ({result['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_prefill(ax, result: dict, colors: dict) -> None:
    batch = result["prefill"][0]["batch"]
    rows = [r for r in result["prefill"] if r["batch"] == batch]
    xs = [r["n_txt"] for r in rows]
    for m in result["modes"]:
        ratio = [r["ratio"][m] for r in rows]
        spread = [[x - r["ratio_iqr"][m][0] for x, r in zip(ratio, rows)], [r["ratio_iqr"][m][1] - x for x, r in zip(ratio, rows)]]
        ax.errorbar(xs, ratio, yerr=spread, fmt="o-", color=colors[m], capsize=2, label=f"{m} measured")
        ax.plot(xs, [r["flop_ratio"][m] for r in rows], "--", color=colors[m], alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("text tokens")
    ax.set_ylabel("prefill time / vanilla")
    ax.set_title(f"prefill, batch {batch}, {result['n_img']} image tokens\n(bars: quartiles; dashed: FLOPs)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)


def _plot_peak_memory(ax, result: dict) -> None:
    modes, last, dec = result["modes"], result["prefill"][-1], result["decode"]
    x = range(len(modes))
    ax.bar([i - 0.2 for i in x], [last["peak_bytes"][m] / last["peak_bytes"]["vanilla"] for m in modes], width=0.4,
           label=f"prefill B={last['batch']}, text {last['n_txt']}")  # fmt: skip
    ax.bar([i + 0.2 for i in x], [dec[m]["peak_bytes"] / dec["vanilla"]["peak_bytes"] for m in modes], width=0.4,
           label=f"generate {dec['vanilla']['new_tokens']} tokens, B=1")  # fmt: skip
    ax.set_xticks(list(x), modes)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("peak memory / vanilla")
    ax.set_title("peak memory above the weights")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)


def _settings(ax, result: dict) -> None:
    """The run's settings and the routed-cache-vs-recompute result, as text (no bar to overlap)."""
    ax.axis("off")
    r = result.get("routing", {})
    lines = [f"routing: split {r.get('split_layer')}, " + (f"fusion at {r.get('fusion_at')}" if r.get("fusion_at")
             else f"K={r.get('fusion_layers')}") + f", D={r.get('side_depth')}",  # fmt: skip
             f"{result.get('threads')} threads; ratios: medians of paired,", "interleaved runs against vanilla"]
    if "recompute" in result:
        rc = result["recompute"]
        lines += ["", f"LF generating {rc['new_tokens']} tokens:", f"routed cache {rc['speedup']:.1f}x faster than",
                  "the paper's full recompute"]
    ax.text(0.02, 0.95, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=11)


def _plot_lf_share(ax, result: dict) -> None:
    """LF's measured prefill saving / analytic saving per text length, one line per batch (quartile bars)."""
    ax.set_title("LF prefill saving / analytic saving")
    if "lf" not in result["modes"]:
        ax.text(0.5, 0.5, "lf not benchmarked", ha="center", transform=ax.transAxes)
        return
    flops = min(r["flop_ratio"]["lf"] for r in result["prefill"])
    if flops >= 1:  # a split so deep that the side branch costs what the text-only layers save
        ax.text(0.5, 0.5, f"LF saves no FLOPs here (FLOP ratio >= {flops:.3f})", ha="center", transform=ax.transAxes)
        return
    for batch in sorted({r["batch"] for r in result["prefill"]}):
        rows = [r for r in result["prefill"] if r["batch"] == batch]
        xs = [r["n_txt"] for r in rows]
        share, lo, hi = zip(*(saving_shares(r, "lf") for r in rows))
        ax.errorbar(xs, share, yerr=[[m - l for m, l in zip(share, lo)], [h - m for m, h in zip(share, hi)]],
                    fmt="o-", capsize=2, label=f"batch {batch}")  # fmt: skip
    ax.axhline(0.9, color="k", ls="--", lw=0.8, label="target 90%")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("text tokens")
    ax.set_ylabel("measured / analytic saving")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_breakdown(result: dict, path: Path) -> None:
    """`dpvr breakdown`: per mode, two stacked bars (vanilla over the mode's layer ranges, and the mode),
    one segment per stage in run order, and each stage's excess over vanilla's layer rate."""
    modes = list(result["modes"])
    n_stages = max(len(t["stages"]) for t in result["modes"].values()) + 1
    fig = Figure(figsize=(15, len(modes) * (2.4 + 0.12 * n_stages)))
    axes = fig.subplots(len(modes), 2, squeeze=False, gridspec_kw={"width_ratios": [2.4, 1]})
    for row, mode in zip(axes, modes):
        t = result["modes"][mode]
        names = [s["name"] for s in t["stages"]] + ["everything else"]
        bars = {"vanilla": [s["vanilla_seconds"] or 0.0 for s in t["stages"]] + [t["vanilla_other_seconds"]],
                mode: [s["seconds"] for s in t["stages"]] + [t["other_seconds"]]}  # fmt: skip
        ax = row[0]
        for y, (label, widths) in enumerate(bars.items()):
            left = 0.0
            for i, w in enumerate(widths):
                ms = 1000 * w
                ax.barh(y, ms, left=left, color=f"C{i % 10}", edgecolor="white", label=names[i] if y == 1 else None)
                if ms > 0.05 * 1000 * t["vanilla_total_seconds"]:
                    ax.text(left + ms / 2, y, f"{ms:.0f}", ha="center", va="center", fontsize=7, color="white")
                left += ms
        ax.set_yticks([0, 1], list(bars))
        ax.set_xlabel("prefill ms (median per stage)")
        ax.set_title(f"{mode}: {t['ratio']:.2f}x vanilla's time for {t['flop_ratio']:.2f}x its FLOPs"
                     + ("" if t["saving_share"] != t["saving_share"] else f" (saves {t['saving_share']:.0%} of the FLOP saving)"),
                     fontsize=9)  # fmt: skip
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=3, frameon=False)
        ax = row[1]
        decoder = [s for s in t["stages"] if s["excess_seconds"] is not None]
        ax.barh(range(len(decoder)), [1000 * s["excess_seconds"] for s in decoder],
                color=[f"C{names.index(s['name']) % 10}" for s in decoder])  # fmt: skip
        ax.set_yticks(range(len(decoder)), [s["name"].split(" (")[0] for s in decoder], fontsize=6)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("ms over vanilla's layer rate")
        ax.set_title("excess per stage", fontsize=9)
    fig.suptitle(f"dpvr breakdown: {result['preset']} on {result['device']} ({result['dtype']}), batch {result['batch']}, "
                 f"{result['n_img']} image + {result['n_txt']} text tokens", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
