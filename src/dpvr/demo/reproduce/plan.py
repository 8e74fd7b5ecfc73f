"""Which rows `dpvr reproduce` runs: the paper's Table 2 at laptop scale, and its three ablation sweeps.

A row either trains (`dpvr train`, one run per seed, then `dpvr eval` of the result) or only evaluates
a routing of the untouched base (vanilla, VTW, FastV, LF-ideal) or of another row's trained side branch
(LF + FastV in the shared stack). `routing` is what the row's inference runs: it gives the analytic
FLOPs and the measured prefill time ratio, and it is the same dict for the train and eval sides.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dpvr.config import MODE_TRAITS, DPVRConfig
from dpvr.train.args import DEFAULT_LR

FASTV = {"fastv_layer": DPVRConfig.fastv_layer, "fastv_ratio": DPVRConfig.fastv_ratio}  # the paper's K=2, R=50%

# learning-rate families swept on the validation split; each trained row uses its family's pick
FAMILY_OF = {"full": "full", "lora": "lora", "lf": "lf", "pc": "pc", "kv": "pc"}  # PC and KV share one
LR_FACTORS = (1 / 3, 1.0, 3.0)  # around the tiny model's defaults (dpvr.train.args.DEFAULT_LR)
QUICK_LR_FACTORS = (1.0, 3.0)  # --quick: the same sweep, two candidates
LR_STEP = 3.0  # a pick at the grid's edge adds the next candidate out by this factor ...
LR_EXTENSIONS = 1  # ... this many times at most (each is a quarter-epoch run; a pick still at an edge is flagged)
# the split sweep's points besides the chosen split, spread evenly from layer 2 to L - 2: three fit the
# 3-hour budget (the v11 run: 162.6 min in all; v10 ran seven, every second layer, 4.1-5.2 min each, and
# its curve rose monotonically from s=2 to s=14: docs/train.md, "Three split points")
SPLIT_POINTS = 3


@dataclass(frozen=True)
class Row:
    name: str
    train: tuple[str, ...] = ()  # `dpvr train` arguments; empty: an evaluation-only row
    routing: dict = field(default_factory=dict)  # mode, split_layer, fusion_layers, side_depth, shallow_fastv, ...
    adapter_of: str | None = None  # evaluate this row's trained side branch (per seed) with `routing` on top
    sweep: tuple[str, int] | None = None  # ("split", 6): a point of an ablation curve

    @property
    def trains(self) -> bool:
        return bool(self.train)

    @property
    def method(self) -> str | None:
        """`dpvr train --method` of a trained row (dpvr, lora, full)."""
        return self.train[self.train.index("--method") + 1] if self.trains else None

    @property
    def config(self) -> DPVRConfig:
        """`routing` typed: the fields it leaves out keep DPVRConfig's defaults."""
        return DPVRConfig.from_dict(self.routing)

    @property
    def family(self) -> str | None:
        if not self.trains:
            return None
        return FAMILY_OF[self.routing["mode"] if self.method == "dpvr" else self.method]


def dpvr_row(name: str, mode: str, split: int, K: int = 1, D: int = 1, sweep=None, fusion_at=()) -> Row:
    args = ("--method", "dpvr", "--mode", mode, "--split_layer", str(split), "--fusion_layers", str(K),
            "--side_depth", str(D))  # fmt: skip
    routing = {"mode": mode, "split_layer": split, "fusion_layers": K, "side_depth": D}
    if fusion_at:
        args += ("--fusion_at", *map(str, fusion_at))
        routing["fusion_at"] = tuple(fusion_at)
    return Row(name, args, routing, sweep=sweep)


def plan(quick: bool, L: int, split: int, fusion_at: tuple[int, ...] = ()) -> list[Row]:
    """`fusion_at`: the sparse fusion layers `dpvr analyze` suggests; with them come two rows, LF fused there
    and LF fused at as many last layers (the same number of fusion layers)."""
    baseline = {"mode": "vanilla"}
    rows = [  # Table 2 before the ablation sweeps: a run cut short by --minutes has the paper's main table
        Row("vanilla", routing=baseline),
        dpvr_row("DPVR-LF", "lf", split),
        dpvr_row("DPVR-PC", "pc", split),
        # KV trains PC's side branch (same text outputs, hence the same loss and gradients): its row runs
        # each seed's PC branch as KV instead of training it again
        Row("DPVR-KV", routing={"mode": "kv", "split_layer": split, "fusion_layers": 1, "side_depth": 1}, adapter_of="DPVR-PC"),
        Row("DPVR-LF-ideal", routing={"mode": "lf", "split_layer": split, "fusion_layers": 0}, sweep=("fusion", 0)),
        Row("VTW", routing={"mode": "vtw", "split_layer": split}),
        Row("FastV (K=2, R=50%)", routing={"mode": "fastv", **FASTV}),
    ]
    if FASTV["fastv_layer"] < split:  # FastV prunes inside the shared stack [0, split): it needs room there
        rows.append(Row("DPVR-LF + FastV", routing={"mode": "lf", "split_layer": split, "fusion_layers": 1,
                                                    "side_depth": 1, "shallow_fastv": True, **FASTV},
                        adapter_of="DPVR-LF"))  # fmt: skip
    # each of their runs costs about as much as ten side-branch runs on the shared-stack cache; r=64 after
    # full fine-tuning, so a run cut short by --minutes can still judge "the side branch matches LoRA / full"
    rows += [
        Row("LoRA r=16", ("--method", "lora", "--lora_r", "16"), baseline),
        # LLaVA's full fine-tuning (the image encoder frozen), said explicitly: a run from before that default is not reused
        Row("full fine-tune", ("--method", "full", "--train_vision_tower", "false"), baseline),
        Row("LoRA r=64", ("--method", "lora", "--lora_r", "64"), baseline),
    ]
    splits = [split - 2] if quick else [s for s in split_points(L) if s != split]
    rows += [dpvr_row(f"LF s={s}", "lf", s, sweep=("split", s)) for s in splits if 1 <= s < L - 1]
    fusion_at = tuple(i for i in fusion_at if split <= i < L)
    n_at = len(fusion_at)  # the sparse row's match, the last n_at layers, is also the fusion sweep's K = n_at
    rows += [dpvr_row(f"LF last {k} (same count)" if k == n_at else f"LF K={k}", "lf", split, K=k, sweep=("fusion", k))
             for k in ((2,) if quick else (2, 3, 4))]  # fmt: skip
    rows += [dpvr_row(f"LF D={d}", "lf", split, D=d, sweep=("depth", d)) for d in ((2,) if quick else (2, 3))]
    if fusion_at:
        at = ",".join(map(str, fusion_at))
        rows.append(dpvr_row(f"LF fusion_at={at} (analyze)", "lf", split, K=n_at, fusion_at=fusion_at,
                             sweep=("placement", n_at)))  # fmt: skip
        if n_at not in ((2,) if quick else (2, 3, 4)):
            rows.append(dpvr_row(f"LF last {n_at} (same count)", "lf", split, K=n_at, sweep=("fusion", n_at)))
    return rows


def split_points(L: int) -> list[int]:
    """The split sweep's layers for an L-layer backbone: SPLIT_POINTS of them, evenly from 2 to L - 2."""
    lo, hi = 2, L - 2
    return sorted({round(lo + (hi - lo) * i / (SPLIT_POINTS - 1)) for i in range(SPLIT_POINTS)})


def sweep_rows(rows: list[Row]) -> dict[str, Row]:
    """One representative trained row per learning-rate family (the first that uses it)."""
    reps: dict[str, Row] = {}
    for row in rows:
        if row.trains and row.sweep is None:
            reps.setdefault(row.family, row)
    return reps


def learning_rates(family: str, quick: bool = False) -> list[float]:
    centre = DEFAULT_LR[family]
    return [float(f"{centre * f:.2g}") for f in (QUICK_LR_FACTORS if quick else LR_FACTORS)]


def beyond_edge(losses: dict[float, float]) -> float | None:
    """The next learning rate to try when the lowest loss sits at the edge of those tried: one LR_STEP
    beyond it (toward lower losses); None when the minimum is interior."""
    lrs = sorted(losses)
    best = min(lrs, key=losses.get)
    if len(lrs) < 2 or lrs[0] < best < lrs[-1]:
        return None
    return float(f"{best / LR_STEP if best == lrs[0] else best * LR_STEP:.2g}")


def eval_arguments(row: Row) -> list[str]:
    """`dpvr eval` routing flags for an evaluation-only row (the base model, or another row's adapter)."""
    r, cfg = row.routing, row.config
    if cfg.mode == "vanilla":
        return []
    if row.adapter_of:  # the adapter carries its routing; only a twin mode or a composition is added
        names = ["mode"] if MODE_TRAITS[cfg.mode].twin else []
        names += ["fastv_layer", "fastv_ratio"] if "fastv_layer" in r else []
    else:  # a conversion of the base: the fields the row sets (mode first, as each row writes it)
        names = [k for k in r if k != "shallow_fastv"]
    return cfg.to_argv(names) + (["--shallow-fastv"] if cfg.shallow_fastv else [])
