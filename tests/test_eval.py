"""dpvr eval: metric math against hand-computed values; the runner and lmms-eval request handling on
an untrained tiny LLaVA (batched vs single, deterministic, errors propagate)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dpvr import DPVRConfig, convert
from dpvr.cli import main
from dpvr.embedded import build_tiny_model
from dpvr.eval import evaluate
from dpvr.eval.lmms_plugin import MANIFEST, _layers, continuation_logprobs, generate_texts
from dpvr.eval.metrics import normalise, score_all


def sample(i, family, answer, **meta):
    return {"id": f"s{i}", "meta": {"family": family, "answer": answer, **meta}}


def test_lmms_fusion_at_model_arg_is_colon_separated():
    assert _layers("24:28") == (24, 28) and _layers("7") == (7,) and _layers("") == () and _layers((3, 4)) == (3, 4)
    with pytest.raises(ValueError, match="colon-separated"):
        _layers("24,28")


def test_pope_metrics_by_hand():
    truth = ["yes", "yes", "no", "no", "yes", "no"]
    replies = ["Yes.", "no", "yes", "No", "yes", "maybe"]
    samples = [sample(i, "pope", t, subset="random" if i < 4 else "adversarial") for i, t in enumerate(truth)]
    s = score_all(samples, replies)["pope"]
    # tp=2 (0, 4), fp=1 (2), fn=1 (1); 'maybe' -> other: a wrong 'no'
    assert s["accuracy"] == pytest.approx(3 / 6) and s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 6)
    assert s["subsets"]["random"]["accuracy"] == pytest.approx(2 / 4)
    assert s["subsets"]["adversarial"]["f1"] == pytest.approx(1.0)


def test_mme_accuracy_plus_and_mmbench_circular_by_hand():
    mme = [sample(0, "mme", "yes", pair_id="a"), sample(1, "mme", "no", pair_id="a"),
           sample(2, "mme", "yes", pair_id="b"), sample(3, "mme", "no", pair_id="b")]  # fmt: skip
    mmb = [sample(4 + r, "mmbench", "ABCD"[r], circ_group="g1", rotation=r) for r in range(4)]
    mmb += [sample(8 + r, "mmbench", "ABCD"[r], circ_group="g2", rotation=r) for r in range(4)]
    replies = ["yes", "no", "yes", "yes"] + ["A. 3", "B", "C", "D"] + ["A", "B", "C", "A"]
    scores = score_all(mme + mmb, replies)
    assert scores["mme"]["accuracy"] == pytest.approx(3 / 4) and scores["mme"]["accuracy_plus"] == pytest.approx(1 / 2)
    assert scores["mme"]["score"] == pytest.approx(125.0)
    assert scores["mmbench"]["accuracy"] == pytest.approx(7 / 8)
    assert scores["mmbench"]["circular_accuracy"] == pytest.approx(1 / 2)
    assert scores["mean"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert normalise("count", " 3 digits") == "3" and normalise("mmbench", "(c)") == "C"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, digit_bench):
    data = digit_bench(3, train=2, val=2, test=6, existence=2, all=2)
    model, processor = build_tiny_model(seed=0)
    return model.eval(), processor, data, tiny_checkpoint


def test_evaluate_is_deterministic_and_batch_independent(tiny):
    model, processor, data, _ = tiny
    a = evaluate(model, processor, data, batch_size=16, progress=False)
    b = evaluate(model, processor, data, batch_size=1, progress=False)
    assert a["replies"] == b["replies"] and a["scores"] == b["scores"]
    assert {"pope", "mme", "mmbench", "count", "spatial"} <= set(a["scores"])


def test_eval_cli_fastv_writes_json(tiny, tmp_path):
    _, _, data, root = tiny
    rc = main(["eval", "--model", str(root), "--data", str(data), "--mode", "fastv", "--fastv-layer", "1",
               "--out", str(tmp_path), "--families", "pope,spatial"])  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["model"].startswith("fastv") and set(result["scores"]) == {"pope", "spatial", "mean"}


def test_eval_cli_shallow_fastv_composes_with_lf_and_refuses_stock(tiny, tmp_path, capsys):
    _, _, data, root = tiny
    rc = main(["eval", "--model", str(root), "--data", str(data), "--mode", "lf", "--split-layer", "6", "--shallow-fastv",
               "--fastv-layer", "2", "--out", str(tmp_path), "--families", "spatial", "--limit-per-family", "4"])  # fmt: skip
    assert rc == 0
    assert json.loads((tmp_path / "eval.json").read_text())["model"] == "lf s=6 K=1 D=1 +FastV@2 ratio=0.5 in [0, s)"
    rc = main(["eval", "--model", str(root), "--data", str(data), "--shallow-fastv", "--out", str(tmp_path / "x")])
    assert rc != 0 and "--shallow-fastv composes with lf/pc/kv/vtw" in capsys.readouterr().err


def test_eval_cli_contrast_strength_zero_answers_as_without(tiny, tmp_path):
    """The contrast flags reach the model (eval.json records them); at strength 0 every reply is the plain one."""
    _, _, data, root = tiny
    base = ["eval", "--model", str(root), "--data", str(data), "--families", "pope,spatial", "--limit-per-family", "6"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "c0"), "--contrast-strength", "0", "--contrast-early", "2"]) == 0
    plain, c0 = (json.loads((tmp_path / n / "eval.json").read_text()) for n in ("plain", "c0"))
    assert plain["contrast"] is None and c0["contrast"] == {"early_layer": 2, "layers": [12, 13, 14, 15], "strength": 0.0}
    assert c0["replies"] == plain["replies"]


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def test_lmms_generate_batched_equals_single_and_until_cuts(tiny):
    model, processor, _, _ = tiny
    routed = convert(build_tiny_model(seed=0)[0], DPVRConfig(mode="lf", split_layer=6)).eval()
    items = [("which digit is in the top left cell ?", {"max_new_tokens": 3}, [_image(1)]),
             ("is 2 larger than 5 ?", {"max_new_tokens": 3}, []),
             ("<image>\nhow many digits are in the image ?", {"max_new_tokens": 3}, [_image(2)])]  # fmt: skip
    for m in (model, routed):
        batched = generate_texts(m, processor, items, batch_size=8)
        single = [generate_texts(m, processor, [it], batch_size=1)[0] for it in items]
        assert batched == single
    first = batched[0].split()[0] if batched[0] else ""
    cut = generate_texts(routed, processor, [(items[0][0], {"max_new_tokens": 3, "until": [first]}, items[0][2])])
    assert first == "" or cut[0] == "", cut


def test_lmms_loglikelihood_and_errors_propagate(tiny):
    model, processor, _, _ = tiny
    (lp, greedy), = continuation_logprobs(model, processor, [("is there a 3 in the image ?", " yes", [_image(3)])])
    assert lp < 0 and np.isfinite(lp) and isinstance(greedy, bool)
    with pytest.raises(Exception):  # two images but one placeholder's worth of features: must raise, not answer ""
        generate_texts(model, processor, [("x", {}, [_image(1)]), ("y", {}, [object()])])
    with pytest.raises(ValueError, match="unsupported generation kwargs"):
        generate_texts(model, processor, [("x", {"repetition_penalty": 2.0}, [])])


def test_lmms_manifest_without_lmms_eval_says_how_to_install():
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'dpvr\[lmms\]'"):
            MANIFEST()
    else:
        assert MANIFEST().model_id == "dpvr_llava"
