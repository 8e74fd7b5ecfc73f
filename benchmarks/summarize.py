"""Tables from docs/evidence/*.jsonl: final held-out accuracy per family, and the first eval step
(and wall seconds) at which POPE, MME and spatial reached 0.9.

    python3 benchmarks/summarize.py [name-prefix ...] [--logs DIR]
"""
import argparse
import json
from pathlib import Path

FAMS = ["pope", "mme", "mmbench", "count", "spatial", "where", "probe"]


def first(recs, fam, thr=0.9):
    for r in recs:
        if r.get(fam, 0) >= thr:
            return f"{r['step']} ({r['wall'] / 60:.1f}m)"
    return "-"


LOGS = Path(__file__).resolve().parents[1] / "docs" / "evidence"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prefix", nargs="*", help="only the runs whose name starts with one of these")
    p.add_argument("--logs", default=str(LOGS), help="folder of the runs' .jsonl logs (default: %(default)s)")
    args = p.parse_args(argv)
    logs = sorted(Path(args.logs).glob("*.jsonl"))
    pre = args.prefix
    print("| run | steps | min | " + " | ".join(FAMS) + " | yes share | pope>=.9 at | spatial>=.9 at | attention on scene/image per layer |")
    print("|" + " --- |" * (len(FAMS) + 7))
    for p in logs:
        if pre and not any(p.stem.startswith(x) for x in pre):
            continue
        lines = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        recs = [r for r in lines if "step" in r and "pope" in r]
        if not recs:
            continue
        stages = sorted({r.get("stage", "") for r in recs}, key=[r.get("stage", "") for r in recs].index)
        for st in stages:
            rs = [r for r in recs if r.get("stage", "") == st]
            last = rs[-1]
            att = [r for r in lines if ("attention_on_scene" in r or "attention_on_image" in r) and r.get("stage", "") == st]
            prof = (att[-1].get("attention_on_scene") or att[-1].get("attention_on_image")) if att else []
            name = p.stem + (f" [{st}]" if st else "")
            accs = " | ".join(f"{last.get(f, float('nan')):.2f}" for f in FAMS)
            print(f"| {name} | {last['step']} | {last['wall'] / 60:.1f} | {accs} | {last.get('pope_yes_share', float('nan')):.2f} | "
                  f"{first(rs, 'pope')} | {first(rs, 'spatial')} | {' '.join(f'{x:.2f}' for x in prof)} |")


if __name__ == "__main__":
    main()
