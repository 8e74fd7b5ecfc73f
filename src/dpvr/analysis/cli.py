"""`dpvr analyze`: the paper's three-view saturation analysis plus layer-wise masking; recommends a split.

    dpvr analyze                                    # embedded tiny LLaVA on the digit-scenes test split
    dpvr analyze --model llava-hf/llava-1.5-7b-hf --data llava_v1_5_mix665k.json --images DIR -n 200 \\
                 --dtype bfloat16 --batch-size 1 --out runs/analysis-7b

Writes OUT/analysis.json (every statistic, per layer, with standard errors, plus the recommendation and
the run's settings), OUT/analysis.csv (one row per layer), OUT/analysis.png (Figure 2 + masking
curves) and OUT/attention_truth.png (where the answer's query looks in the image: relevant cells,
persistent noise, late review; `attention_truth.py`), and prints the per-layer table, the recommended
`split_layer` with its reason, and the attention section.
Runs on the stock model with sdpa; nothing needs eager attention.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from dpvr.analysis import MASK_TOL
from dpvr.cli_types import at_least
from dpvr.errors import DPVRError
from dpvr.model_flags import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = parser.add_argument_group("data")
    d.add_argument("--data", default=None, help="LLaVA-665k-format JSON; none: the digit-scenes test split")
    d.add_argument("--images", default=None, help="image folder the JSON's paths are relative to; none: the "
                   "benchmark's images/, or the JSON's own folder")  # fmt: skip
    d.add_argument("-n", "--num-samples", type=at_least(1), default=200, help="random image samples to analyse")
    d.add_argument("--seed", type=int, default=0, help="which random samples")
    d.add_argument("--template", default="chat", choices=["chat", "vicuna_v1"], help="prompt template")
    d.add_argument("--max-answer-tokens", type=int, default=16, help="skip samples whose first answer is longer")
    a = parser.add_argument_group("analysis")
    a.add_argument("--batch-size", type=at_least(1), default=8, help="samples per forward (1 for 7B on one GPU is safe)")
    a.add_argument("--mask-samples", type=int, default=None,
                   help="how many of the samples also get the masking analysis (2L+1 variants each); none: all")  # fmt: skip
    a.add_argument("--no-masking", action="store_true", help="skip the layer-wise masking analysis")
    a.add_argument("--mask-rows", type=int, default=16,
                   help="masking variants per forward (each holds a copy of the prompt's KV cache: ~0.3 GB at 7B bf16)")  # fmt: skip
    a.add_argument("--collapse-frac", type=float, default=0.2,
                   help="attention has collapsed once the mass is <= this fraction of its peak")  # fmt: skip
    a.add_argument("--kl-frac", type=float, default=0.5,
                   help="logit-lens transition: first layer from which KL stays <= this fraction of its max")  # fmt: skip
    a.add_argument("--margin", type=int, default=2, help="split at least this many layers before the vision transition")
    a.add_argument("--mask-tol", type=float, default=MASK_TOL,
                   help="without attention collapse: split where blocking every deeper layer costs at most this many nats")
    t = parser.add_argument_group("attention with ground truth (docs/analysis.md)")
    t.add_argument("--truth-query", default="answer", choices=["answer", "question"],
                   help="whose attention over the image: the last prompt token (answer), or the mean over every "
                   "text token after the image up to it (question)")  # fmt: skip
    t.add_argument("--noise-top", type=int, default=5, help="persistent noise: candidates per layer, by mean share")
    t.add_argument("--noise-rate", type=float, default=0.5,
                   help="persistent noise: smallest share of samples that rank the position in their own top --noise-top")  # fmt: skip
    t.add_argument("--noise-floor", type=float, default=2.0,
                   help="persistent noise: smallest mean share, in multiples of the uniform share 1/N")  # fmt: skip
    t.add_argument("--review-tol", type=float, default=MASK_TOL,
                   help="late review: the last layers' masking cost must rise this many nats over the middle's trough")  # fmt: skip
    a.add_argument("--out", default="dpvr-analysis", help="output folder")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is much faster when other processes share the cores)")  # fmt: skip
    add_model_arguments(parser, with_mode=False)


def _check_args(args: argparse.Namespace) -> None:
    if args.adapter is not None:
        raise DPVRError("--adapter: the analysis measures the vanilla model; pass the base checkpoint as --model")
    if not 0 < args.collapse_frac < 1 or not 0 < args.kl_frac < 1:
        raise DPVRError(f"--collapse-frac {args.collapse_frac} and --kl-frac {args.kl_frac} must be in (0, 1)")
    for name in ("batch_size", "mask_rows", "num_samples"):
        if getattr(args, name) < 1:
            raise DPVRError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.margin < 0 or (args.mask_samples is not None and args.mask_samples < 0):
        raise DPVRError("--margin and --mask-samples must be >= 0")
    if not args.mask_tol >= 0:
        raise DPVRError(f"--mask-tol {args.mask_tol} must be >= 0 (nats)")
    if args.noise_top < 1:
        raise DPVRError(f"--noise-top {args.noise_top} must be >= 1")
    if not 0 < args.noise_rate <= 1:  # `not` also refuses NaN
        raise DPVRError(f"--noise-rate {args.noise_rate} must be in (0, 1]")
    if not 0 <= args.noise_floor < float("inf"):
        raise DPVRError(f"--noise-floor {args.noise_floor} must be a finite number >= 0")
    if not 0 <= args.review_tol < float("inf"):
        raise DPVRError(f"--review-tol {args.review_tol} must be a finite number >= 0 (nats)")


def resolve_data(data: str | None, images: str | None) -> tuple[Path, Path]:
    """(JSON, image folder); defaults to the digit-scenes test split, written on first use."""
    if data is None:
        from dpvr.data.digit_scenes import ensure_benchmark

        root = ensure_benchmark()
        return root / "test.json", Path(images) if images else root / "images"
    path = Path(data)
    if not path.is_file():
        raise DPVRError(f"--data {data}: no such file")
    return path, Path(images) if images else path.parent


def run(args: argparse.Namespace) -> int:
    import torch

    _check_args(args)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _analyze(args)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get their setting back


def _analyze(args: argparse.Namespace) -> int:
    from dpvr.analysis.inputs import select_samples
    from dpvr.analysis.masking import masking_variants
    from dpvr.analysis.plots import plot_analysis
    from dpvr.analysis.report import format_table, write_outputs
    from dpvr.analysis.summary import recommend_split
    from dpvr.analysis.truth_plot import plot_attention_truth
    from dpvr.analysis.truth_report import format_truth
    from dpvr.loading import load_model, resolve_model_path
    from dpvr.routing import DPVRForConditionalGeneration

    started = time.perf_counter()
    if args.model is None and not (Path(resolve_model_path(None)) / "config.json").is_file():
        raise DPVRError(f"the embedded checkpoint is missing at {resolve_model_path(None)}; pass --model")
    data, images = resolve_data(args.data, args.images)
    model, processor = load_model(model=args.model, attn=args.attn, dtype=args.dtype, device=args.device)
    if isinstance(model, DPVRForConditionalGeneration):
        raise DPVRError(f"{args.model} is a DPVR checkpoint; the analysis measures the stock model (pass its base)")
    items, skipped = select_samples(
        data, images, processor, n=args.num_samples, seed=args.seed, template=args.template,
        max_answer_tokens=args.max_answer_tokens, progress=not args.quiet,
    )  # fmt: skip
    n_mask = 0 if args.no_masking else min(len(items), args.mask_samples if args.mask_samples is not None else len(items))
    L = model.config.text_config.num_hidden_layers
    acc, truth_acc = _measure(model, processor, items, masking_variants(L), n_mask, args)
    curves = acc.curves()
    if all(m != m for m in curves["mass"]):  # all NaN
        raise DPVRError("no sample has text after its image: the text-to-image attention mass is undefined")
    rec = recommend_split(curves, collapse_frac=args.collapse_frac, kl_frac=args.kl_frac, margin=args.margin,
                          mask_tol=args.mask_tol)  # fmt: skip
    truth = _truth(acc, truth_acc, items, n_mask, args)
    meta = {
        "model": resolve_model_path(args.model), "data": str(data), "images": str(images), "n_samples": len(items),
        "n_masking": n_mask, "skipped": dict(skipped), "seed": args.seed, "template": args.template,
        "dtype": args.dtype, "device": str(model.device), "seconds": round(time.perf_counter() - started, 1),
        "torch": _torch_version(),
    }  # fmt: skip
    paths = write_outputs(args.out, curves, rec, meta, truth=truth)
    title = f"{Path(meta['model']).name}: {len(items)} samples ({n_mask} masked), {L} layers"
    paths["png"] = plot_analysis(curves, rec, Path(args.out) / "analysis.png", title=title)
    paths["truth_png"] = plot_attention_truth(truth, Path(args.out) / "attention_truth.png", title=title)
    print(format_table(curves, rec))
    print(format_truth(truth))
    if skipped:
        print(f"skipped samples: {dict(skipped)}")
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - started:.0f} s")
    return 0


def _measure(model, processor, items: list[dict], blocked, n_mask: int, args: argparse.Namespace):
    """One pass over the samples: the three views and the answer query's attention on every sample, the
    masking variants on the first n_mask. Returns (Accumulator, TruthAccumulator)."""
    from tqdm import tqdm

    from dpvr.analysis.attention_truth import TruthAccumulator
    from dpvr.analysis.grounding import patch_grid_tokens, query_mask
    from dpvr.analysis.masking import score_variants
    from dpvr.analysis.saturation import measure_batch
    from dpvr.analysis.summary import Accumulator
    from dpvr.data.collate import Collator

    collate = Collator(pad_token_id=processor.tokenizer.pad_token_id, padding_side="right", keep_ids=False)
    acc = Accumulator()
    truth = TruthAccumulator(top_k=args.noise_top, min_rate=args.noise_rate, floor=args.noise_floor,
                             grid_tokens=patch_grid_tokens(model.config))  # fmt: skip
    bar = tqdm(total=len(items), desc="analyze", unit="sample", disable=args.quiet)
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        batch = collate(chunk)
        at = query_mask(batch["input_ids"], batch["labels"], model.config.image_token_id, args.truth_query)
        stats, embeds = measure_batch(model, batch, attend_from=at)
        acc.add(stats)
        truth.add(stats.image_attn, [it.get("meta") for it in chunk], [it.get("question") for it in chunk])
        k = max(0, min(len(chunk), n_mask - start))  # samples of this batch that also get the masking analysis
        if k:
            sub = {key: v[:k] for key, v in batch.items() if key != "pixel_values"}
            ll, correct = score_variants(model, embeds[:k], sub, blocked, max_rows=args.mask_rows)
            acc.add_masking(ll, correct)
        bar.update(len(chunk))
    bar.close()
    return acc, truth


def _truth(acc, truth_acc, items: list[dict], n_mask: int, args: argparse.Namespace):
    """The attention-truth result; the late review reads the masked samples' log-likelihoods by family."""
    from dpvr.analysis.attention_truth import family_of

    ll = acc.arrays().get("ll") if n_mask else None
    families = [family_of(it.get("meta")) for it in items[:n_mask]]
    query = {"answer": "last prompt token", "question": "mean over the text tokens after the image"}[args.truth_query]
    return truth_acc.result(ll=ll, families=families, review_tol=args.review_tol, query=query)


def _torch_version() -> str:
    import torch

    return torch.__version__
