"""Does each of the paper's claims hold at this scale? Pure functions of the rows `dpvr reproduce`
summarised, so the rules are written once and tested on their own.

A claim's verdict is "holds", "does not hold", or "undecided" when a row it rests on is missing or its
held-out loss was still falling at the end of training: no verdict rests on an unconverged run.
"""
from __future__ import annotations

POINT = 0.01  # one point of mean score: the "matches" / "at most 1 point lost" margin


def _score(rows: dict, name: str) -> float:
    return rows[name]["mean"]["mean"]


def _blocked(rows: dict, names: list[str]) -> str | None:
    missing = [n for n in names if n not in rows]
    if missing:
        return f"rows not run: {', '.join(missing)}"
    falling = [n for n in names if rows[n].get("converged") is False]
    return f"still falling: {', '.join(falling)}" if falling else None


def _verdict(claim: str, names: list[str], rows: dict, test, evidence) -> dict:
    why = _blocked(rows, names)
    if why:
        return {"claim": claim, "verdict": "undecided", "evidence": why}
    return {"claim": claim, "verdict": "holds" if test() else "does not hold", "evidence": evidence()}


def _fmt(rows: dict, names: list[str]) -> str:
    return ", ".join(f"{n} {_score(rows, n):.3f}" for n in names)


def verdicts(rows: dict[str, dict], zero_grad: dict | None) -> list[dict]:
    """rows: name -> summary with mean['mean'], flop_ratio, trainable_params, converged (None: not trained)."""
    out = []
    pckv = ["DPVR-LF", "DPVR-PC", "DPVR-KV"]
    out.append(_verdict(
        "LF matches PC/KV at lower cost", pckv, rows,
        lambda: _score(rows, "DPVR-LF") >= max(_score(rows, n) for n in pckv[1:]) - POINT
        and rows["DPVR-LF"]["flop_ratio"] < min(rows[n]["flop_ratio"] for n in pckv[1:]),
        lambda: _fmt(rows, pckv) + "; FLOPs " + ", ".join(f"{rows[n]['flop_ratio']:.2f}" for n in pckv)))  # fmt: skip
    for kind, main, claim in (("fusion", 1, "K = 1 fusion layer suffices"), ("depth", 1, "D = 1 side layer suffices")):
        others = [n for n, r in rows.items() if r.get("sweep") and r["sweep"][0] == kind and r["sweep"][1] > main]
        names = ["DPVR-LF", *(others or [f"(a {kind} sweep)"])]  # without the sweep there is nothing to compare
        out.append(_verdict(claim, names, rows,
                            lambda names=names: _score(rows, "DPVR-LF") >= max(_score(rows, n) for n in names) - POINT,
                            lambda names=names: _fmt(rows, names)))  # fmt: skip
    splits = sorted((r["sweep"][1], n) for n, r in rows.items() if r.get("sweep") and r["sweep"][0] == "split")
    shallow = [splits[0][1]] if splits else ["(a split sweep)"]
    out.append(_verdict(
        "too shallow a split hurts", ["DPVR-LF", *shallow], rows,
        lambda: _score(rows, shallow[0]) < _score(rows, "DPVR-LF") - POINT,
        lambda: _fmt(rows, ["DPVR-LF", *shallow])))  # fmt: skip
    ref = ["LoRA r=16", "LoRA r=64", "full fine-tune"]
    out.append(_verdict(
        "the side branch matches LoRA / full fine-tuning with a fraction of their parameters", ["DPVR-LF", *ref], rows,
        lambda: _score(rows, "DPVR-LF") >= max(_score(rows, n) for n in ref) - POINT
        and rows["DPVR-LF"]["trainable_params"] < min(rows[n]["trainable_params"] for n in ref),
        lambda: _fmt(rows, ["DPVR-LF", *ref]) + "; trainable " + ", ".join(
            f"{rows[n]['trainable_params']:,d}" for n in ["DPVR-LF", *ref])))  # fmt: skip
    if zero_grad is None:
        out.append({"claim": "LF-ideal's side branch gets zero gradient", "verdict": "undecided", "evidence": "not measured"})
    else:
        out.append({"claim": "LF-ideal's side branch gets zero gradient",
                    "verdict": "holds" if zero_grad["lf_ideal"] == 0.0 < zero_grad["lf"] else "does not hold",
                    "evidence": f"largest absolute side-branch gradient: K=0 {zero_grad['lf_ideal']:.3g}, K=1 {zero_grad['lf']:.3g}"})  # fmt: skip
    combo = ["DPVR-LF + FastV", "vanilla", "DPVR-LF"]
    out.append(_verdict(
        "beyond the paper: LF + FastV in the shared stack saves >= 50% of prefill FLOPs with <= 1 point of mean "
        "score lost (against vanilla and against LF alone)", combo, rows,
        lambda: rows[combo[0]]["flop_ratio"] <= 0.5
        and _score(rows, combo[0]) >= max(_score(rows, "vanilla"), _score(rows, "DPVR-LF")) - POINT,
        lambda: _fmt(rows, combo) + f"; FLOPs {rows[combo[0]]['flop_ratio']:.2f} of vanilla's"))  # fmt: skip
    return out
