"""The demo's summary sentences say what the table says: which method is the most accurate at or below
each cost, and which are beaten by one that costs no more (made-up rows, ties and a one-method front)."""
from __future__ import annotations

import pytest

from demo_claims import claims, disagreements
from dpvr.demo.summary import front, verdict


def rows(*specs):
    return [{"method": m, "mean": mean, "flop_ratio": f, "prefill_ratio": t} for m, mean, f, t in specs]


DEMO_LIKE = rows(("vanilla", 0.580, 1.0, 1.0), ("FastV", 0.548, 0.64, 0.83), ("VTW", 0.530, 0.69, 0.87),
                 ("DPVR-LF K=1", 0.520, 0.74, 0.95), ("DPVR-LF at 11,13", 0.571, 0.85, 0.90))  # fmt: skip


@pytest.mark.parametrize("cost", ["flop_ratio", "prefill_ratio"])
def test_the_sentence_names_the_best_method_at_or_below_every_cost(cost):
    sentence = verdict(DEMO_LIKE, cost)
    assert disagreements(sentence, [(r["method"], r["mean"], r[cost]) for r in DEMO_LIKE]) == [], sentence


def test_the_front_of_the_demo_like_table():
    assert [r["method"] for r in front(DEMO_LIKE, "flop_ratio")] == ["FastV", "DPVR-LF at 11,13", "vanilla"]
    tiers, beaten = claims(verdict(DEMO_LIKE, "flop_ratio"))
    assert [t[1] for t in tiers] == ["FastV", "DPVR-LF at 11,13", "vanilla"]
    assert sorted(beaten) == ["DPVR-LF K=1", "VTW"]


def test_ties_go_to_the_cheaper_method_and_a_single_winner_reads_right():
    tied = rows(("a", 0.5004, 1.0, 1.0), ("b", 0.5001, 0.7, 0.7), ("c", 0.4, 0.7, 0.7))  # a and b show as 0.500
    sentence = verdict(tied, "flop_ratio")
    assert [t[1] for t in claims(sentence)[0]] == ["b"]
    assert disagreements(sentence, [(r["method"], round(r["mean"], 3), r["flop_ratio"]) for r in tied]) == []
    alone = rows(("vanilla", 0.6, 1.0, 1.0), ("x", 0.5, 1.0, 1.2))
    assert verdict(alone, "prefill_ratio").endswith("up to 1.00x vanilla (mean 0.600); x is beaten by a method that "
                                                    "costs no more.")  # fmt: skip


def test_the_checker_catches_a_wrong_sentence():
    """The check itself can fail: a sentence that names a beaten method, or forgets one, is caught."""
    table = [(r["method"], r["mean"], r["flop_ratio"]) for r in DEMO_LIKE]
    right = verdict(DEMO_LIKE, "flop_ratio")
    assert disagreements(right.replace("FastV (mean 0.548)", "VTW (mean 0.530)"), table)
    assert disagreements(right.replace("VTW and ", ""), table)
    assert disagreements(right.replace("0.571", "0.581"), table)


def test_the_paired_bootstrap_is_zero_for_the_same_answers_and_grows_with_disagreement():
    from dpvr.demo.noise import paired_se

    samples = [{"id": f"q{i}", "meta": {"family": "count", "answer": str(i % 3)}} for i in range(60)]
    right = {s["id"]: s["meta"]["answer"] for s in samples}
    half = {k: (v if i % 2 else "9") for i, (k, v) in enumerate(right.items())}
    se = paired_se(samples, {"vanilla": right, "same": dict(right), "half": half}, "vanilla", rounds=200)
    assert se["vanilla"] == se["same"] == 0.0
    assert 0.04 < se["half"] < 0.09  # a half-wrong method: sd of a mean of 60 coin flips, about 0.065


def test_the_noise_sentence_says_which_differences_are_within_two_standard_errors():
    from demo_claims import noise_disagreements
    from dpvr.demo.summary import noise

    diffs = {"vanilla": (0, 0), "FastV": (-0.032, 0.012), "VTW": (0.008, 0.015), "DPVR-LF at 11,13": (-0.006, 0.012)}
    rows = [{"method": m, "vs_vanilla": d, "vs_vanilla_se": se} for m, (d, se) in diffs.items()]
    sentence = noise(rows)
    table = [(m, d, se) for m, (d, se) in diffs.items() if m != "vanilla"]
    assert noise_disagreements(sentence, table) == [], sentence
    assert "FastV (-0.032 ± 0.012) differs from it by more" in sentence
    assert noise_disagreements(sentence.replace("VTW (+0.008", "VTW (+0.048"), table)  # the check can fail
    far = noise([{**r, "vs_vanilla_se": 0.001} for r in rows])
    assert "within" not in far and noise_disagreements(far, [(m, d, 0.001) for m, d, _ in table]) == []
