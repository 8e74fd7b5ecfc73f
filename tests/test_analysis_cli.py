"""The split rule on constructed curves, and `dpvr analyze` end to end on an untrained tiny LLaVA."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from dpvr.analysis.summary import collapse_layer, recommend_split, transition_layer
from dpvr.cli import main
from dpvr.embedded.model import TEXT_LAYERS


def paper_like_curves(L: int = 32) -> dict:
    """The abstract's 7B mass curve (0.68 at layer 0, 0.07 by 4, ~0.04 after 18) and an image KL that
    drops below half its maximum at layer 20."""
    mass = np.interp(np.arange(L), [0, 4, 18, L - 1], [0.68, 0.07, 0.04, 0.04])
    kl_image = np.where(np.arange(L) < 20, 2.0, 0.5 * np.linspace(1, 0, L))
    kl_text = np.linspace(3, 0, L)
    return {"num_layers": L, "mass": mass.tolist(), "kl_image": kl_image.tolist(), "kl_text": kl_text.tolist()}


def test_split_rule_on_paper_like_curves():
    c = paper_like_curves()
    assert collapse_layer(c["mass"], 0.2) == 4  # layer 3: 0.2225 > 0.2 x 0.68; layer 4: 0.07
    assert transition_layer(c["kl_image"], 0.5) == 20
    rec = recommend_split(c, collapse_frac=0.2, kl_frac=0.5, margin=2)
    assert rec.in_window and rec.split == 18 and rec.vision_transition == 20
    assert "collapsed at layer 4" in rec.reason and "2 layers later" in rec.reason
    assert recommend_split(c, margin=5).split == 15


def test_split_rule_falls_back_when_attention_never_collapses():
    c = paper_like_curves(12)
    c["mass"] = [0.9, 0.88, 0.87, 0.86, 0.86, 0.85, 0.85, 0.84, 0.84, 0.83, 0.83, 0.8]
    rec = recommend_split(c, collapse_frac=0.2)
    assert not rec.in_window and rec.collapse_layer is None
    assert rec.split == 7 and "never collapses" in rec.reason  # 18/32 of 12 layers


def test_without_collapse_the_split_comes_from_the_masking_curve():
    """v5 of the embedded default: attention never collapses, but blocking every layer from 11 on costs
    nothing; the split goes there, not to the depth-ratio fallback (9), where blocking costs 0.39 nats."""
    c = paper_like_curves(16)
    c["mass"] = [0.91, 0.68, 0.76, 0.69, 0.82, 0.73, 0.72, 0.79, 0.88, 0.79, 0.73, 0.79, 0.84, 0.65, 0.77, 0.82]
    c["dll_onward"] = [-2.17, -1.0, -0.93, -0.87, -0.72, -0.69, -0.57, -0.58, -0.48, -0.39, -0.16, -0.015,
                       -0.01, -0.021, -0.01, -0.006]  # fmt: skip
    rec = recommend_split(c)
    assert not rec.in_window and rec.split == 11 and "masking curve" in rec.reason and "never collapses" in rec.reason
    assert recommend_split(c, mask_tol=0.2).split == 10
    c["dll_onward"][14] = -0.3  # a late layer that still reads the image: no split before it qualifies
    assert recommend_split(c).split == 15
    c["dll_onward"][15] = -0.3  # not even the last layer: the depth-ratio fallback, said so
    rec = recommend_split(c)
    assert rec.split == 9 and "fallback" in rec.reason


def test_transition_needs_the_curve_to_stay_low():
    kl = [1.0, 0.2, 0.9, 0.8, 0.3, 0.1, 0.0]  # dips at 1, but only stays below 0.5 from 4 on
    assert transition_layer(kl, 0.5) == 4
    assert collapse_layer([0.1, 0.5, 0.3, 0.05, 0.2], 0.2) == 3  # measured from the peak (layer 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint, digit_bench):
    """(folder with the untrained tiny checkpoint as model/, a 3-scene digit-scenes benchmark)."""
    d = tmp_path_factory.mktemp("analyze")
    (d / "model").symlink_to(tiny_checkpoint, target_is_directory=True)
    data = digit_bench(0, train=2, val=1, test=3, existence=2, all=2)
    return d, data


def test_analyze_writes_json_csv_png_and_prints_a_recommendation(setup, capsys):
    d, data = setup
    out = d / "out"
    rc = main(["analyze", "--model", str(d / "model"), "--data", str(data / "test.json"), "--images", str(data / "images"),
               "-n", "5", "--mask-samples", "3", "--batch-size", "2", "--out", str(out), "--quiet", "--threads", "1"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    result = json.loads((out / "analysis.json").read_text())
    L = result["curves"]["num_layers"]
    assert L == TEXT_LAYERS and result["meta"]["n_samples"] == 5 and result["curves"]["n_masking"] == 3
    assert result["curves"]["kl_image"][-1] == 0.0 and len(result["curves"]["dll_only"]) == L
    assert 1 <= result["recommendation"]["split"] < L
    with open(out / "analysis.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == L and float(rows[3]["mass"]) == pytest.approx(result["curves"]["mass"][3], rel=1e-5)
    assert (out / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"recommended split_layer = {result['recommendation']['split']}" in printed
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    # the attention analysis with ground truth (tests/test_attention_truth.py checks its numbers)
    truth = result["attention_truth"]
    assert truth["n_samples"] == 5 and truth["n_grounded"] >= 1 and "all" in truth["grounding"]
    for g in truth["grounding"].values():
        assert len(g["share"]) == L and all(math.isclose(s + r, 1.0) for s, r in zip(g["share"], g["rest"]))
    assert truth["noise"]["n_image_tokens"] == 144 and len(truth["noise"]["share"]) == L
    assert truth["late_review"]["all"]["n_samples"] == 3 and isinstance(truth["late_review"]["all"]["review"], bool)
    assert (out / "attention_truth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "relevant cells' share" in printed and "persistent noise" in printed and "late review [all" in printed


@pytest.mark.parametrize(
    "extra, message, code",
    [(["--adapter", "x"], "--adapter", 1), (["--collapse-frac", "1.5"], "--collapse-frac", 1),
     (["-n", "0"], "--num-samples", 2)],  # 2: a usage error caught by the option's type, as argparse exits
)
def test_analyze_bad_options_are_one_line_errors(setup, capsys, extra, message, code):
    d, data = setup
    rc = main(["analyze", "--model", str(d / "model"), "--data", str(data / "test.json"), "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code and len(err) == 1 and message in err[0], err


def test_analyze_refuses_data_without_image_samples(setup, tmp_path, capsys):
    d, _ = setup
    (tmp_path / "text.json").write_text(json.dumps([{"id": "t0", "conversations": [
        {"from": "human", "value": "how many cells ?"}, {"from": "gpt", "value": "4"}]}]))  # fmt: skip
    rc = main(["analyze", "--model", str(d / "model"), "--data", str(tmp_path / "text.json"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "no usable image sample" in err and "text_only" in err, err
