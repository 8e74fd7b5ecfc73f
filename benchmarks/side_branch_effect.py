"""How much can LF's side branch move the held-out loss on the embedded default? The val loss (the one the
reproduction's plateau rule watches) of the stock model, VTW (no image after the split), and LF with its
side branch copied from layer s (the trained rows' start), made a no-op (its residual writes zeroed, so the
fusion layers read the image states as they left layer s) or randomly initialised; for K = 1 and K = 4.

    python3 benchmarks/side_branch_effect.py [--split 11] [--limit 256]   # -> docs/evidence/side_branch_effect.json

If LF's loss barely depends on its side branch, a side branch trained from the copy has little to gain,
and LF's gap to vanilla comes from the text layers between the split and the fusion layers.
"""
import argparse
import json
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dpvr import DPVRConfig, convert
from dpvr.atomic import atomic_write_text
from dpvr.data.collate import IGNORE, Collator
from dpvr.loading import resolve_model_path
from dpvr.train.args import DataArguments
from dpvr.train.cli import build_dataset

OUT = Path(__file__).resolve().parents[1] / "docs" / "evidence" / "side_branch_effect.json"


def held_out_loss(model, batches) -> float:
    """Token-weighted mean answer-token loss over every batch."""
    total = count = 0.0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != IGNORE).sum())
            total, count = total + model(**b).loss.item() * n, count + n
    return total / count


def no_op(model) -> None:
    """Zero the side branch's residual writes: each of its layers then returns its input."""
    with torch.no_grad():
        for name, p in model.side_branch.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", type=int, default=11)
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--data", default=None, help="val.json to score (default: the seed-0 digit scenes' val.json)")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    ap.add_argument("--out", default=str(OUT), help="where the JSON goes (default: %(default)s)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base = resolve_model_path(args.model)
    proc = AutoProcessor.from_pretrained(base)
    dargs = DataArguments(eval_data=args.data, eval_limit=args.limit)
    data = build_dataset(dargs, proc, held_out=True)  # the plateau rule's val set
    collate = Collator(pad_token_id=proc.tokenizer.pad_token_id, keep_ids=False)
    batches = [collate([data[i] for i in range(j, min(j + 16, len(data)))]) for j in range(0, len(data), 16)]
    for b in batches:  # build_dataset marks skipped samples; the model takes none of that
        b.pop("skipped", None)
    stock = lambda: LlavaForConditionalGeneration.from_pretrained(base).eval()  # noqa: E731
    out = {"split": args.split, "samples": len(data), "vanilla": held_out_loss(stock(), batches),
           "vtw": held_out_loss(convert(stock(), DPVRConfig(mode="vtw", split_layer=args.split)), batches)}
    for K in (1, 4):
        for init in ("copy", "no-op", "random"):
            cfg = DPVRConfig(mode="lf", split_layer=args.split, fusion_layers=K,
                             side_init="random" if init == "random" else "copy")
            model = convert(stock(), cfg).eval()
            if init == "no-op":
                no_op(model)
            out[f"lf K={K} {init}"] = held_out_loss(model, batches)
            print(f"lf K={K} {init}: {out[f'lf K={K} {init}']:.4f}", flush=True)
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
