"""What `dpvr analyze` recommends, read back as an object, and the routing it implies for other commands.

    rec = read_recommendation("runs/demo")          # a demo folder, an analyze folder or its analysis.json
    routing(rec)                                     # DPVRConfig(mode="lf", split_layer=10, fusion_at=(10, 13), ...)
    dpvr eval --from runs/demo                       # that routing, with the side branch the demo trained for it
    dpvr generate --from runs/demo --image x.png --prompt "..."

The recommendation is LF at the recommended split, fused at the layers the masking curve picks
(`fusion_at`), or at the last layer (the paper's K = 1) when it picks none. `--from DIR` finds, among
the side branches trained under DIR (`DIR/*/final`), the one whose recorded routing is that one; with
none, the side branch is untrained (copied from the layers after the split), and the command says so.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dpvr.analysis.summary import Recommendation
from dpvr.config import DPVRConfig
from dpvr.errors import DPVRError, UsageError

ANALYSIS = "analysis.json"


def analysis_file(path: str | Path) -> Path:
    """analysis.json itself, in the folder, or in the folder's analyze/ (a `dpvr demo` or `reproduce` output)."""
    path = Path(path)
    for candidate in (path, path / ANALYSIS, path / "analyze" / ANALYSIS):
        if candidate.is_file():
            return candidate
    raise DPVRError(f"{path}: no {ANALYSIS} there or in {path / 'analyze'} (run `dpvr analyze --out {path}` first)")


def read_analysis(path: str | Path) -> dict:
    return json.loads(analysis_file(path).read_text())


def read_recommendation(path: str | Path) -> Recommendation:
    data = read_analysis(path)["recommendation"]
    known = {f.name for f in dataclasses.fields(Recommendation)}
    rec = Recommendation(**{k: v for k, v in data.items() if k in known})
    return dataclasses.replace(rec, fusion_at=tuple(rec.fusion_at or ()))


def routing(rec: Recommendation) -> DPVRConfig:
    """LF at the recommended split, fused where the masking curve says text still reads the image (else K = 1)."""
    if rec.fusion_at:
        return DPVRConfig(mode="lf", split_layer=rec.split, fusion_at=tuple(rec.fusion_at))
    return DPVRConfig(mode="lf", split_layer=rec.split, fusion_layers=1)


def same_routing(a: DPVRConfig, b: DPVRConfig) -> bool:
    keys = ("mode", "split_layer", "fusion_layers", "fusion_at")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def trained_for(folder: str | Path, want: DPVRConfig) -> Path | None:
    """The side branch under `folder` (`*/final`, trained by `dpvr train`) whose recorded routing is `want`."""
    from dpvr.routing.adapter import ADAPTER_CONFIG

    for meta in sorted(Path(folder).glob(f"*/final/{ADAPTER_CONFIG}")):
        if same_routing(DPVRConfig.from_dict(json.loads(meta.read_text())["dpvr"]), want):
            return meta.parent
    return None


FLAGS = ("adapter", "mode", "split_layer", "fusion_at")  # what --from sets


def from_folder(folder: str | Path, given: dict) -> tuple[dict, str]:
    """(load_model keyword arguments, a line saying what was chosen) for `--from folder`; `given`: the
    command's other model arguments, which must not also set the routing."""
    from dpvr.config import routing_default

    clash = [k for k in FLAGS if given.get(k) not in (None, ())]
    clash += [k for k in ("fusion_layers", "side_depth") if given.get(k, routing_default(k)) != routing_default(k)]
    if clash:
        flags = ", ".join("--" + k.replace("_", "-") for k in clash)
        raise UsageError(f"--from {folder} sets the routing from its analysis; drop {flags}")
    rec, analysis = read_recommendation(folder), read_analysis(folder)
    cfg = routing(rec)
    where = f"fusion at {','.join(map(str, cfg.fusion_at))}" if cfg.fusion_at else "K=1"
    kwargs = dict(given, mode="lf", split_layer=cfg.split_layer, fusion_at=cfg.fusion_at, fusion_layers=cfg.fusion_layers)
    if given.get("model") is None:  # the model the analysis read, unless that is the embedded default
        from dpvr.loading import resolve_model_path

        analysed = analysis.get("meta", {}).get("model")
        kwargs["model"] = None if analysed in (None, resolve_model_path(None)) else analysed
    adapter = trained_for(folder, cfg)
    if adapter is not None:
        kwargs.update(adapter=str(adapter), mode=None, split_layer=None, fusion_at=(), fusion_layers=routing_default("fusion_layers"))
        side = f"side branch trained for it: {adapter}"
    else:
        side = f"no side branch trained for it under {folder}: an untrained one (copies of the layers after the split)"
    return kwargs, f"[from {folder}] dpvr analyze recommends LF at split {cfg.split_layer}, {where}; {side}"
