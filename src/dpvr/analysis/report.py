"""Writing the analysis: JSON (everything), CSV (one row per layer), and the short printed table.

    write_outputs(out_dir, curves, rec, meta)  -> {"json": ..., "csv": ...}
    print(format_table(curves, rec))

All files are written atomically (temp file in the same directory, then os.replace).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

from dpvr.analysis.summary import Recommendation
from dpvr.atomic import atomic_write_text

# per-layer columns, in CSV order (masking columns only when scored)
LAYER_COLUMNS = ["cos_image", "cos_image_sem", "cos_text", "cos_text_sem", "mass", "mass_sem", "mass_max_head",
                 "mass_max_head_index", "kl_image", "kl_image_sem", "kl_text", "kl_text_sem"]  # fmt: skip
MASKING_COLUMNS = ["dll_only", "dll_only_sem", "dll_onward", "dll_onward_sem", "acc_only", "acc_onward"]


def _atomic_write(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


def _clean(x):
    """NaN -> None so the JSON is standard."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return x


def columns(curves: dict) -> list[str]:
    return LAYER_COLUMNS + (MASKING_COLUMNS if "dll_only" in curves else [])


def write_outputs(out_dir: str | os.PathLike, curves: dict, rec: Recommendation, meta: dict, truth=None) -> dict[str, Path]:
    """truth: an `attention_truth.AttentionTruth` (its to_dict() goes under "attention_truth")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "recommendation": asdict(rec), "curves": curves}
    if truth is not None:
        payload["attention_truth"] = truth.to_dict()
    paths = {"json": _atomic_write(out / "analysis.json", json.dumps(_clean(payload), indent=1) + "\n")}
    buf = io.StringIO()
    writer = csv.writer(buf)
    cols = columns(curves)
    writer.writerow(["layer", *cols])
    for layer in range(curves["num_layers"]):
        writer.writerow([layer, *(_fmt_csv(curves[c][layer]) for c in cols)])
    paths["csv"] = _atomic_write(out / "analysis.csv", buf.getvalue())
    return paths


def _fmt_csv(v) -> str:
    return "" if isinstance(v, float) and math.isnan(v) else (f"{v:.6g}" if isinstance(v, float) else str(v))


def format_table(curves: dict, rec: Recommendation) -> str:
    """One line per layer: the three views, and the masking deltas when scored; then the recommendation."""
    masking = "dll_only" in curves
    head = f"{'layer':>5} {'cos_img':>8} {'cos_txt':>8} {'mass':>7} {'maxhead':>8} {'KL_img':>8} {'KL_txt':>8}"
    if masking:
        head += f" {'dLL@l':>8} {'dLL>=l':>8} {'acc@l':>6} {'acc>=l':>6}"
    lines = [head]
    for i in range(curves["num_layers"]):
        marks = "".join(m for m, at in (("s", rec.split), ("c", rec.collapse_layer), ("v", rec.vision_transition)) if at == i)
        row = (f"{i:>5} {curves['cos_image'][i]:8.4f} {curves['cos_text'][i]:8.4f} {curves['mass'][i]:7.4f} "
               f"{curves['mass_max_head'][i]:8.4f} {curves['kl_image'][i]:8.4f} {curves['kl_text'][i]:8.4f}")  # fmt: skip
        if masking:
            row += (f" {curves['dll_only'][i]:8.3f} {curves['dll_onward'][i]:8.3f} {curves['acc_only'][i]:6.3f}"
                    f" {curves['acc_onward'][i]:6.3f}")  # fmt: skip
        lines.append(row + (f"  <{marks}" if marks else ""))
    if masking:
        lines.append(f"no blocking: answer log-lik {curves['ll_base']:.3f}, accuracy {curves['acc_base']:.3f}")
    lines.append("marks: s = recommended split, c = attention collapse, v = vision logit-lens transition")
    lines.append(f"recommended split_layer = {rec.split}: {rec.reason}")
    if rec.fusion_reason:
        lines.append(f"suggested fusion_at = {','.join(map(str, rec.fusion_at)) or '(none)'}: {rec.fusion_reason}")
    return "\n".join(lines)
