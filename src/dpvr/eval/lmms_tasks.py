"""Local lmms-eval tasks built from a digit-scenes split, so that `python -m lmms_eval --model dpvr_llava`
can be checked against `dpvr eval` on the same questions (no download; tests/test_lmms_real.py):

    python -m dpvr.eval.lmms_tasks --out runs/lmms-tasks [--data DIR] [--limit 40]
    python -m lmms_eval --model dpvr_llava --model_args pretrained=PATH,device=cpu,dtype=float32 \\
        --include_path runs/lmms-tasks --tasks dpvr_scenes_yesno,dpvr_scenes_short,dpvr_scenes_mc --log_samples \\
        --output_path runs/lmms-out

Tasks: a yes/no generation task (the `pope` family), a short-answer generation task (`spatial`), both
scored as `dpvr eval` scores those families, and a 5-choice loglikelihood task on the `count` questions
(lmms-eval's `multiple_choice` output type, metric `acc`). Each task is a JSONL of flat records plus a
YAML; the YAMLs' functions live here (the generated utils.py only re-exports them).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dpvr.eval.metrics import normalise

# task name -> (digit-scenes family, lmms-eval output type)
TASKS = {
    "dpvr_scenes_yesno": ("pope", "generate_until"),
    "dpvr_scenes_short": ("spatial", "generate_until"),
    "dpvr_scenes_mc": ("count", "multiple_choice"),
}
COUNT_CHOICES = ["0", "1", "2", "3", "4"]  # a scene has four cells
# dpvr eval's generation settings (greedy, 4 new tokens, no stop string); image_aspect_ratio is there
# because real lmms-eval tasks set it: dpvr_llava must ignore it, with a warning, not fail
GENERATION = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "until": [], "image_aspect_ratio": "pad"}


def doc_to_visual(doc: dict) -> list:
    from PIL import Image

    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs=None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match after dpvr eval's per-family normalisation."""
    return {"accuracy": float(normalise(doc["family"], results[0]).lower() == doc["answer"].lower())}


def _yaml(name: str, family: str, output_type: str, data_file: Path) -> str:
    head = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {json.dumps(str(data_file))}",
            "test_split: test", f"output_type: {output_type}", "doc_to_visual: !function utils.doc_to_visual",
            "doc_to_text: !function utils.doc_to_text"]  # fmt: skip
    if output_type == "multiple_choice":
        body = ["doc_to_target: answer", f"doc_to_choice: {json.dumps(COUNT_CHOICES)}",
                "metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true"]  # fmt: skip
    else:
        body = ["doc_to_target: answer", "generation_kwargs:", *(f"  {k}: {json.dumps(v)}" for k, v in GENERATION.items()),
                "process_results: !function utils.process_results",
                "metric_list:", "  - metric: accuracy", "    aggregation: mean", "    higher_is_better: true"]  # fmt: skip
    return "\n".join(head + body) + "\n"


def write_tasks(data_dir: str | Path, out: str | Path, split: str = "test", limit: int | None = None) -> dict[str, list[str]]:
    """Write the three tasks under `out`; returns {task: [sample ids in order]}."""
    from dpvr.data.digit_scenes import load_split

    data_dir, out = Path(data_dir).resolve(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = load_split(data_dir, split)
    ids = {}
    for name, (family, output_type) in TASKS.items():
        chosen = [s for s in samples if s["meta"]["family"] == family][:limit]
        records = [{"id": s["id"], "family": family, "question": s["conversations"][0]["value"], "answer": s["meta"]["answer"],
                    "image": str(data_dir / "images" / s["image"])} for s in chosen]  # fmt: skip
        _write(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        _write(out / f"{name}.yaml", _yaml(name, family, output_type, (out / f"{name}.jsonl").resolve()))
        ids[name] = [r["id"] for r in records]
    _write(out / "utils.py", "from dpvr.eval.lmms_tasks import doc_to_text, doc_to_visual, process_results  # noqa: F401\n")
    return ids


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dpvr.eval.lmms_tasks", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the task YAMLs and data (pass it as --include_path)")
    ap.add_argument("--data", default=None, help="digit-scenes folder (default: the cache for --seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--limit", type=int, default=None, help="first N questions of each task")
    args = ap.parse_args(argv)
    from dpvr.data.digit_scenes import open_benchmark

    ids = write_tasks(open_benchmark(args.data, args.seed), args.out, args.split, args.limit)
    print(", ".join(f"{k}: {len(v)} questions" for k, v in ids.items()) + f"; tasks in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
