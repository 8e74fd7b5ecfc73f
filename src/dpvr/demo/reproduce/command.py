"""`dpvr reproduce`: the paper's tables, sweeps and claims, re-run on the embedded default.

    dpvr reproduce                 # analysis, LR sweep, every row x 3 seeds to a held-out plateau, verdicts
    dpvr reproduce --minutes 100   # start no run after 100 minutes; the same command later goes on
    dpvr reproduce --minutes 0     # start nothing: report on every run finished so far
    dpvr reproduce --quick         # the same code paths at toy sizes, < 5 minutes (a test runs it)

1. `dpvr analyze` (Figure 2's three saturation views) recommends the split;
2. a learning-rate sweep per method family (LF, PC/KV, LoRA, full) on the validation split's loss;
3. every trained row, every seed: at least one epoch of train.json, then on until the held-out loss
   plateaus (capped at two epochs; the same rule for every method; DPVR rows read the frozen shared
   stack's output from OUT/shared-stack, filled once per split, from the deepest split below it
   there; removed once every run has finished, unless --keep-cache), then `dpvr eval` on the test
   split with the paper's metrics; evaluation-only rows
   (vanilla, VTW, FastV, LF-ideal, LF + FastV) are scored the same way;
4. `dpvr bench` on the base's shape: the Table 8 analogue over text lengths, and every row's analytic
   prefill FLOPs and measured prefill time ratio;
5. LF-ideal's side-branch gradient, measured;
6. OUT/table.md (rows, mean ± std, trainable parameters, FLOPs, time, convergence), OUT/claims.md (a
   verdict per claim), OUT/results.json and the plots.
Each run is a resumable step in its own folder (reused on a rerun), so an interrupted reproduction
keeps its finished rows. Runs can go side by side (`--jobs`, `dpvr.demo.reproduce.jobs`);
OUT/calls.json records each call's wall-clock.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from functools import partial
from itertools import zip_longest
from pathlib import Path

from dpvr.atomic import atomic_write_text
from dpvr.demo.recipe import (BATCH, BF16, CACHE_FOLDER, HELD_OUT_LIMIT, HELD_OUT_POINTS, MAX_EPOCHS, MIN_EPOCHS,
                              budget, epoch_steps, release_cache, training_flags)
from dpvr.demo.reproduce.jobs import Job, run_jobs
from dpvr.demo.steps import STAMP, Step, model_fingerprint
from dpvr.demo.reproduce.plan import Row, eval_arguments, plan, sweep_rows


CALLS = "calls.json"  # under OUT: the wall-clock of every call that ran steps
JOBS = 1  # runs at a time; two side by side on 2 cores ran each run 1.7x (evaluations 2-3x) slower: docs/train.md


class NotStarted(Exception):
    """A run (LR-sweep candidate or row) past --minutes that no earlier call finished: left for the next call."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dpvr.cli_types import at_least, non_negative_float, positive_float  # a 0 step count would read as "not given" below

    p.add_argument("--quick", action="store_true", help="toy sizes: one seed, 2-point sweeps, few steps")
    p.add_argument("--model", default=None, help="base llava checkpoint (default: the embedded tiny LLaVA)")
    p.add_argument("--split-layer", type=at_least(1), default=None, help="s of the main rows (default: `dpvr analyze`'s pick)")
    p.add_argument("--epochs", type=positive_float, default=MIN_EPOCHS,
                   help="epochs of train.json every run trains before its plateau may end it")
    p.add_argument("--max-epochs", type=positive_float, default=MAX_EPOCHS, help="cap of a run still falling, in epochs")
    p.add_argument("--steps", type=at_least(1), default=None,
                   help="exactly this many training steps per run instead of --epochs/--max-epochs (quick: 6)")
    p.add_argument("--seeds", type=at_least(1), default=None, help="seeds per trained row (default 3; quick 1)")
    p.add_argument("--sweep-seeds", type=at_least(1), default=None,
                   help="seeds per ablation-sweep row (default: --seeds)")
    p.add_argument("--minutes", type=non_negative_float, default=None,
                   help="start no new run (LR-sweep candidate or row) after this many minutes; the report covers every finished run, "
                   "earlier calls' included (rerun to go on; 0 starts none and reports on what is there)")
    p.add_argument("--batch-size", type=at_least(1), default=BATCH)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=BF16,
                   help="train with bf16 autocast (fp32 weights; evaluation stays fp32); --no-bf16 trains in fp32")
    p.add_argument("--lr-sweep-steps", type=at_least(1), default=None, help="steps per LR candidate (default: a quarter epoch)")
    p.add_argument("--held-out-points", type=at_least(1), default=None,
                   help="held-out loss evaluations over the budget (default 12; quick 3); a run ends early at a plateau")
    p.add_argument("--held-out-limit", type=at_least(1), default=None, help="val samples scored for the held-out loss (default 256)")
    p.add_argument("--eval-per-family", type=at_least(1), default=None, help="test questions per family (default all; quick 4)")
    p.add_argument("--bench-repeats", type=at_least(1), default=None, help="paired timing rounds (default 5; quick 1)")
    p.add_argument("--jobs", type=at_least(1), default=JOBS,
                   help="runs side by side, each a process with its share of the CPU threads (1: in-process, one after "
                   "the other; on this project's 2-core machine 2 saved 6%% end to end, docs/train.md)")
    p.add_argument("--keep-cache", action="store_true",
                   help="keep OUT/shared-stack once every run has finished (removed then by default: tens of GB)")
    p.add_argument("--out", default="runs/reproduce")


class Reproduction:
    """One reproduction's settings and step runner; every artefact lives under `out`."""

    def __init__(self, args: argparse.Namespace):
        from dpvr.loading import resolve_model_path

        self.quick, self.out, self.base = args.quick, Path(args.out), resolve_model_path(args.model)
        self.fingerprint = model_fingerprint(self.base)  # a retrained base reruns every step
        epoch = epoch_steps(args.batch_size)
        self.batch, self.bf16 = args.batch_size, args.bf16
        cap, min_steps = budget(epoch, args.epochs, args.max_epochs)
        self.steps = args.steps or (6 if args.quick else cap)
        self.min_steps = self.steps if args.steps or args.quick else min_steps
        self.sweep_steps = args.lr_sweep_steps or (3 if args.quick else max(1, epoch // 4))
        self.seeds = range(args.seeds or (1 if args.quick else 3))
        self.sweep_seeds = range(args.sweep_seeds or len(self.seeds))
        self.deadline = None if args.minutes is None else time.monotonic() + 60 * args.minutes
        self.points = args.held_out_points or (3 if args.quick else HELD_OUT_POINTS)
        self.held_out = args.held_out_limit or (8 if args.quick else HELD_OUT_LIMIT)
        self.limit = args.eval_per_family or (4 if args.quick else None)
        self.repeats = args.bench_repeats or (1 if args.quick else 5)
        self.jobs = args.jobs
        # threads of each run's process; one job runs its steps in-process with torch's own default
        self.threads = max(1, (os.cpu_count() or 1) // self.jobs) if self.jobs > 1 else None
        self.log: list[str] = []  # every command run or reused, for the record
        self.minutes: dict[str, float] = {}  # stage -> minutes its steps took when they ran (reused ones included)
        self.ran = 0  # steps this call ran (not reused)
        self.cut = False  # past the deadline a run is read back if finished, else not started (LR sweep and rows)
        self._lock = threading.Lock()  # jobs record their steps from several threads
        self.started = time.monotonic()
        calls = self.out / CALLS
        self.calls: list[dict] = json.loads(calls.read_text()) if calls.exists() else []  # earlier calls' wall-clock
        self._call: int | None = None  # this call's index in self.calls, once it has run a step

    def step(self, name: str, argv: list[str], folder: str, reads: tuple[Path, ...] = (), stage: str = "other",
             own_process: bool = False) -> Path:  # fmt: skip
        """`own_process`: a training or evaluation run, which goes side by side with others under --jobs."""
        out = self.out / folder
        step = Step(name, argv, out, "reproduce", self.fingerprint, reads, self.threads if own_process else None)
        if self.cut and self.out_of_time() and not step.done():
            raise NotStarted(name)
        ran = step.run() > 0
        seconds = json.loads((out / STAMP).read_text()).get("seconds", 0.0)  # what a resumed run's steps cost too
        with self._lock:
            self.log.append(f"dpvr {' '.join(argv)}")
            self.minutes[stage] = self.minutes.get(stage, 0.0) + seconds / 60
            self.ran += ran
            if ran:
                self.record_call()
        return out

    def record_call(self) -> None:
        """OUT/calls.json: each call that ran steps, with its wall-clock minutes so far (rewritten after every
        step it runs, so a killed call keeps its time up to its last finished step); the command's
        wall-clock is their sum, and a call that only reused finished runs adds nothing."""
        call = {"ended": time.strftime("%Y-%m-%d %H:%M:%S"), "minutes": round((time.monotonic() - self.started) / 60, 2),
                "jobs": self.jobs, "steps_run": self.ran}  # fmt: skip
        if self._call is None:  # this call's entry, added by its first step
            self._call = len(self.calls)
            self.calls.append(call)
        self.calls[self._call] = call
        atomic_write_text(self.out / CALLS, json.dumps(self.calls, indent=1) + "\n")

    def seeds_of(self, row: Row) -> list[int | None]:
        if not (row.trains or row.adapter_of):
            return [None]
        return list(self.sweep_seeds if row.sweep else self.seeds)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline  # --minutes 0: from the start

    def train(self, row: Row, seed: int, lr: float, steps: int, tag: str, until_plateau: bool = True,
              stage: str | None = None) -> Path:
        """`steps` is the budget; with `until_plateau` the run ends at its held-out plateau if that comes first."""
        points = self.points if until_plateau else 1  # a sweep run needs its last loss only: one, at its end
        cache = str(self.out / CACHE_FOLDER) if row.method == "dpvr" else None
        flags = training_flags(steps, self.batch, points, self.held_out, until_plateau, self.min_steps, cache,
                               self.bf16)
        flags += ["--limit", str(self.steps * self.batch)] if self.quick else []  # one epoch (and cache) of a toy set
        argv = ["train", "--model", self.base, *row.train, "--seed", str(seed), "--max_steps", str(steps),
                "--learning_rate", str(lr), *flags, "--output_dir", str(self.out / tag)]  # fmt: skip
        return self.step(f"train {tag}", argv, tag, stage=stage or row.name, own_process=True)

    def evaluate(self, model_args: list[str], tag: str, stage: str, trained: Path | None = None) -> dict:
        """`trained`: the run's weights the evaluation reads (rerun when they were retrained)."""
        limit = [] if self.limit is None else ["--limit-per-family", str(self.limit)]
        folder = self.step(f"eval {tag}", ["eval", *model_args, *limit, "--out", str(self.out / f"{tag}-eval")],
                           f"{tag}-eval", reads=(trained,) if trained else (), stage=stage, own_process=True)  # fmt: skip
        return json.loads((folder / "eval.json").read_text())["scores"]


def run(args: argparse.Namespace) -> int:
    from transformers import LlavaConfig

    from dpvr.demo.reproduce.measure import bench_ratios, side_branch_gradients
    from dpvr.demo.reproduce.report import summarise, write_report

    rep = Reproduction(args)
    L = LlavaConfig.from_pretrained(rep.base).text_config.num_hidden_layers
    analysis = _analyze(rep)
    split = args.split_layer or int(analysis["recommendation"]["split"])
    rows = plan(rep.quick, L, split, tuple(analysis["recommendation"].get("fusion_at") or ()))
    rep.cut = True
    done = run_jobs(_jobs(rep, rows), rep.jobs, NotStarted)
    rep.cut = False
    lrs = {f: done[LR + f] for f in sweep_rows(rows) if not isinstance(done[LR + f], NotStarted)}
    results: dict[str, dict] = {}
    left: list[str] = []  # runs --minutes left for a later call
    for row in rows:
        names = [_job_name(row.name, seed) for seed in rep.seeds_of(row)]
        left += [name for name in names if isinstance(done[name], NotStarted)]
        if runs := [done[name] for name in names if not isinstance(done[name], NotStarted)]:  # fewer seeds: table.md says so
            results[row.name] = {"row": row, "runs": runs}
    if left:
        print(f"[reproduce] --minutes {args.minutes:g} reached: {len(left)} runs not started ({', '.join(left)}); "
              "rerun the same command to go on (finished runs are reused)", flush=True)  # fmt: skip
    elif note := release_cache(rep.out, args.keep_cache):  # every run finished: nothing reads it again
        print(f"[reproduce] {note}", flush=True)
    rows = [row for row in rows if row.name in results]
    ratios, table8 = bench_ratios(rep, rows, split)  # alone, after every run: its timings are not shared
    zero_grad = side_branch_gradients(rep.base, split)
    summaries = summarise(results, ratios, lrs)
    if rep.ran:  # the bench and the report's own time
        rep.record_call()
    write_report(rep.out, summaries, split, lrs, zero_grad, analysis, rep.log, table8, rep.minutes, rep.calls)
    print((rep.out / "table.md").read_text())
    print((rep.out / "claims.md").read_text())
    return 0


LR = "lr "  # an LR-sweep job's name: LR + family


def _job_name(row: str, seed: int | None) -> str:
    return row + ("" if seed is None else f" seed {seed}")


def _jobs(rep: Reproduction, rows: list[Row]) -> list[Job]:
    """Each family's learning-rate sweep, then every row's seeds in the plan's order; a trained row needs
    its family's sweep, an evaluation of another row's side branch needs that row's run of the seed."""
    from dpvr.demo.reproduce.measure import sweep_family

    # families reading the shared-stack cache alternate with those that do not: the first DPVR sweep fills
    # the split's cache while a baseline sweep, not another DPVR one waiting for that fill, runs beside it
    reps = list(sweep_rows(rows).items())
    pairs = zip_longest([r for r in reps if r[1].method == "dpvr"], [r for r in reps if r[1].method != "dpvr"])
    jobs = [Job(LR + family, partial(sweep_family, rep, family, row))
            for pair in pairs for family, row in filter(None, pair)]  # fmt: skip
    for row in rows:
        for seed in rep.seeds_of(row):
            needs = (LR + row.family,) if row.trains else ()
            needs += (_job_name(row.adapter_of, seed),) if row.adapter_of else ()
            jobs.append(Job(_job_name(row.name, seed), partial(_run_row, rep, row, seed), needs))
    return jobs


def _analyze(rep: Reproduction) -> dict:
    # every sample masked: fewer give a noisy split (9 with 32 masked on v5, 11 with 200)
    n = ["-n", "8", "--mask-samples", "4"] if rep.quick else ["-n", "200"]
    folder = rep.step("analyze", ["analyze", "--model", rep.base, *n, "--batch-size", "8",
                                  "--out", str(rep.out / "analyze")], "analyze", stage="analysis")  # fmt: skip
    return json.loads((folder / "analysis.json").read_text())


def _run_row(rep: Reproduction, row: Row, seed: int | None, needs: dict) -> dict:
    """One seed of a row: train it with its family's learning rate and evaluate it, or evaluate a routing
    of the base (or of the side branch another row trained for this seed)."""
    tag = _slug(row.name) + ("" if seed is None else f"-seed{seed}")
    if row.trains:
        final = rep.train(row, seed, needs[LR + row.family]["chosen"], rep.steps, tag) / "final"
        model = ["--model", str(final)] if row.method == "full" else ["--model", rep.base, "--adapter", str(final)]
        record = json.loads((final / "run.json").read_text())
        return {"seed": seed, "scores": rep.evaluate(model, tag, row.name, final), "record": record, "final": final}
    final = needs[_job_name(row.adapter_of, seed)]["final"] if row.adapter_of else None
    model = ["--model", rep.base] + (["--adapter", str(final)] if final else [])
    return {"seed": seed, "scores": rep.evaluate(model + eval_arguments(row), tag, row.name, final), "record": None,
            "final": final}  # fmt: skip


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")
