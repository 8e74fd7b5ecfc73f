"""The reproduction's measurements besides train/eval: the learning-rate sweep, the prefill FLOP and time
ratios (from `dpvr bench` on the base's shape), and LF-ideal's side-branch gradient."""
from __future__ import annotations

import json

import torch

from dpvr.demo.reproduce.plan import LR_EXTENSIONS, beyond_edge, learning_rates
from dpvr.train.plateau import held_out_curve

BENCH_TEXT_LEN = 16  # the digit-scenes prompts' typical text length (the test split's median is 14-20)


def sweep_family(rep, family: str, row, needs: dict | None = None) -> dict:
    """{"losses": {lr: final held-out loss}, "chosen": lr, "row": name, "at_edge": bool} of one family,
    from short seed-0 runs of its representative `row`: the family's grid, then further candidates while
    the best sits at an edge. Raises NotStarted when --minutes cut it (the family's rows then wait)."""
    losses = {lr: _sweep_loss(rep, row, family, lr) for lr in learning_rates(family, rep.quick)}
    for _ in range(LR_EXTENSIONS):
        lr = beyond_edge(losses)
        if lr is None:
            break
        losses[lr] = _sweep_loss(rep, row, family, lr)
    return {"losses": dict(sorted(losses.items())), "chosen": min(losses, key=losses.get), "row": row.name,
            "at_edge": beyond_edge(losses) is not None}  # fmt: skip


def _sweep_loss(rep, row, family: str, lr: float) -> float:
    """The held-out loss at the end of a seed-0 run of `rep.sweep_steps` (the same steps for every candidate)."""
    final = rep.train(row, 0, lr, rep.sweep_steps, f"lr-sweep-{family}-{lr:g}", until_plateau=False,
                      stage="learning-rate sweep") / "final"
    curve = held_out_curve(json.loads((final / "run.json").read_text())["log_history"])
    return curve[-1][1] if curve else float("inf")


def bench_key(routing: dict, split: int) -> tuple[tuple, str]:
    """((split, K, D, fusion_at) the bench converts with, bench mode name) for a row's inference routing."""
    mode = routing["mode"]
    variant = (routing.get("split_layer", split), max(routing.get("fusion_layers", 1), 1), routing.get("side_depth", 1),
               tuple(routing.get("fusion_at", ())))  # fmt: skip
    if mode == "lf" and routing.get("fusion_layers", 1) == 0:
        return variant, "lf-ideal"
    if routing.get("shallow_fastv"):
        return variant, f"{mode}+fastv"
    return variant, mode


def bench_ratios(rep, rows, split: int) -> tuple[dict, list[dict]]:
    """({row name: {"flop_ratio", "time_ratio", "time_iqr"}} at the typical prompt, batch 1; the main
    variant's prefill rows over text lengths, the paper's Table 8 analogue, which its bench also runs)."""
    keys = {row.name: bench_key(row.routing, split) for row in rows}
    variants: dict[tuple, set] = {}
    for variant, mode in keys.values():
        variants.setdefault(variant, {"vanilla"}).add(mode)
    main = (split, 1, 1, ())
    benches = {}
    for (s, K, D, at), modes in variants.items():
        lens = "16,32,64,128" if (s, K, D, at) == main and not rep.quick else str(BENCH_TEXT_LEN)
        order = ["vanilla", *sorted(modes - {"vanilla"})]
        name = f"bench-s{s}-K{K}-D{D}" + (f"-at{'-'.join(map(str, at))}" if at else "")
        sparse = ["--fusion-at", ",".join(map(str, at))] if at else []
        folder = rep.step(name, [
            "bench", "--preset", rep.base, "--split-layer", str(s), "--fusion-layers", str(K), "--side-depth", str(D),
            *sparse, "--modes", ",".join(order), "--text-lens", lens, "--batches", "1", "--repeats", str(rep.repeats),
            "--new-tokens", "4", "--recompute-text-len", "0", "--no-train-step", "--out", str(rep.out / name)], name, stage="bench")  # fmt: skip
        benches[(s, K, D, at)] = json.loads((folder / "bench.json").read_text())
    out = {}
    for name, (variant, mode) in keys.items():
        row = next(r for r in benches[variant]["prefill"] if r["n_txt"] == BENCH_TEXT_LEN)
        out[name] = {"flop_ratio": row["flop_ratio"][mode], "time_ratio": row["ratio"][mode],
                     "time_iqr": row["ratio_iqr"][mode]}  # fmt: skip
    return out, benches[main]["prefill"] if main in benches else []


def side_branch_gradients(base: str, split: int, n: int = 4) -> dict:
    """Max |grad| over the side branch for LF with K=0 (LF-ideal) and K=1, on the first n training samples
    with LLaVA's label masking (answers only)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from dpvr import DPVRConfig, convert
    from dpvr.data.collate import Collator
    from dpvr.data.digit_scenes import open_benchmark
    from dpvr.data.llava_json import LlavaJsonDataset, load_samples

    root = open_benchmark(None, 0)
    processor = AutoProcessor.from_pretrained(base)
    data = LlavaJsonDataset(load_samples(root / "train.json")[:n], root / "images", processor)
    batch = Collator(pad_token_id=processor.tokenizer.pad_token_id, padding_side="right", keep_ids=False)(
        [data[i] for i in range(n)])  # fmt: skip
    out = {}
    for name, K in (("lf_ideal", 0), ("lf", 1)):
        model = convert(LlavaForConditionalGeneration.from_pretrained(base), DPVRConfig(mode="lf", split_layer=split,
                                                                                      fusion_layers=K))  # fmt: skip
        loss, params = model(**batch).loss, list(model.side_branch.parameters())
        if not loss.requires_grad:  # no path from the side branch to the loss: its gradient is exactly zero
            out[name] = 0.0
            continue
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out[name] = max(g.abs().max().item() if g is not None else 0.0 for g in grads)
    return out
