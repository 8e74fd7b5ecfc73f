"""Reading back what the demo's sentences claim, and checking it against a table, independently of
dpvr.demo.summary (used by test_demo_summary.py on made-up rows and test_demo.py on a real report)."""
from __future__ import annotations

import re

TIER = re.compile(r"up to (\d+\.\d\d)x (.+?) \(mean (\d\.\d\d\d)\)")
BEATEN = re.compile(r"; (.+) (?:is|are) beaten by a method that costs no more\.$")


def claims(sentence: str) -> tuple[list[tuple[float, str, float]], list[str]]:
    """([(cost, method, mean)] from cheapest up, [methods said to be beaten])."""
    tiers = [(float(c), name, float(m)) for c, name, m in TIER.findall(sentence)]
    found = BEATEN.search(sentence)
    beaten = re.split(r", | and ", found.group(1)) if found else []
    return tiers, beaten


def disagreements(sentence: str, table: list[tuple[str, float, float]]) -> list[str]:
    """What the sentence gets wrong about `table` [(method, mean, cost)], as shown (3 and 2 decimals): for every
    cost in the table, the method it names for that cost must have the highest mean among the methods at or
    below it (a tie goes to the cheaper), and every other method must be listed as beaten."""
    tiers, beaten = claims(sentence)
    wrong = []
    if [c for c, _, _ in tiers] != sorted(c for c, _, _ in tiers):
        wrong.append(f"tiers not from the cheapest up: {tiers}")
    for cost in sorted({c for _, _, c in table}):
        within = [(name, mean, c) for name, mean, c in table if c <= cost]
        best = max(within, key=lambda r: (r[1], -r[2]))
        named = [t for t in tiers if t[0] <= cost]
        if not named or named[-1][1] != best[0] or named[-1][2] != best[1]:
            wrong.append(f"at {cost:.2f}x the best is {best[0]} ({best[1]:.3f}); the sentence says {named[-1:] or 'nothing'}")
    rows = {name: (mean, c) for name, mean, c in table}
    for c, name, mean in tiers:
        if rows.get(name) != (mean, c):
            wrong.append(f"the sentence has {name} at {c:.2f}x with mean {mean:.3f}; the table {rows.get(name)}")
    said = {name for _, name, _ in tiers}
    for name, _, _ in table:
        if name not in said and name not in beaten:
            wrong.append(f"{name} is neither named best at a cost nor said to be beaten")
    for name in beaten:
        if name in said or name not in {n for n, _, _ in table}:
            wrong.append(f"{name} is said to be beaten but is best at a cost or not in the table")
    return wrong


NOISE = re.compile(r"((?:[^;,]|,(?! ))+?) \(([+-]\d\.\d\d\d) ± (\d\.\d\d\d)\)")


def noise_disagreements(sentence: str, table: list[tuple[str, float, float]]) -> list[str]:
    """The bootstrap sentence against `table` [(method, mean - vanilla's, its SE)]: the methods before "within
    two standard errors" must have |difference| <= 2 SE, those after "by more" not, with the table's numbers."""
    near_part, _, far_part = sentence.partition("within two standard errors")
    if "by more" in near_part:  # no method is near: the sentence only has the far clause
        near_part, far_part = "", sentence
    rows = {name: (d, se) for name, d, se in table}
    wrong = []
    for part, near in ((near_part, True), (far_part, False)):
        for name, d, se in NOISE.findall(part):
            name = re.sub(r"^(?:By a paired bootstrap over the questions, | ?and )", "", name.strip()).strip()
            if rows.get(name) != (float(d), float(se)):
                wrong.append(f"{name}: {d} ± {se} in the sentence, {rows.get(name)} in the table")
            elif (abs(float(d)) <= 2 * float(se)) != near:
                wrong.append(f"{name} ({d} ± {se}) is said to be {'within' if near else 'beyond'} two standard errors")
    return wrong
