"""Task-conditioned fusion (dpvr.fusion_policy): the policy picks each request's LF fusion placement, and a
request answers exactly as the model does alone under that placement; a batch mixing placements equals
its rows run alone; cached generation equals recomputation; bad policies are refused in one line."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpvr import DPVRConfig, convert
from dpvr.cli import main
from dpvr.data.digit_scenes import load_split
from dpvr.embedded import build_tiny_model
from dpvr.errors import DPVRError
from dpvr.eval.lmms_plugin import continuation_logprobs, generate_texts
from dpvr.eval.runner import evaluate
from dpvr.fusion_policy import FusionPolicy, Request, Rule, by_placement

SPLIT = 9  # of the tiny LLaVA's 16 layers
POLICY = FusionPolicy(default=(15,), rules=(Rule(fusion_at=(10, 13), task="pope"), Rule(fusion_at=(12,), task="count"),
                                            Rule(fusion_at=(11, 14), min_images=2)))  # fmt: skip


@pytest.fixture(scope="module")
def lf(digit_bench):
    base, processor = build_tiny_model(seed=0)
    model = convert(base.eval(), DPVRConfig(mode="lf", split_layer=SPLIT, fusion_layers=1))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an untrained side branch is a copy of layer 9: perturb it so that placements differ
        for p in model.side_branch.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2 * p.abs().mean())
    return model.eval(), processor, digit_bench(3, train=2, val=2, test=6, existence=2, all=2)


# ----------------------------------------------------------------------------- the policy itself
def test_pick_takes_the_first_matching_rule_else_the_default():
    assert POLICY.pick(Request("pope", 1, 20)) == (10, 13)
    assert POLICY.pick(Request("count", 2, 20)) == (12,)  # the task rule comes before the image rule
    assert POLICY.pick(Request("mme", 2, 20)) == (11, 14)
    assert POLICY.pick(Request("mme", 1, 20)) == (15,) == POLICY.pick(Request(None, 1, 0))
    assert POLICY.pick(Request("pope/adversarial", 1, 20)) == (10, 13) and POLICY.pick(Request("popex", 1, 20)) == (15,)
    short = FusionPolicy((15,), (Rule((10,), max_prompt_tokens=8), Rule((12,), max_images=0)))
    assert short.pick(Request("x", 1, 8)) == (10,) and short.pick(Request("x", 1, 9)) == (15,)
    assert short.pick(Request("x", 0, 9)) == (12,)
    assert POLICY.placements == ((15,), (10, 13), (12,), (11, 14))


placements = st.lists(st.integers(0, 40), min_size=1, max_size=4, unique=True)
rules = st.builds(Rule, fusion_at=placements, task=st.none() | st.sampled_from(["pope", "count", "a b"]),
                  min_images=st.integers(0, 3), max_images=st.none() | st.integers(0, 3),
                  max_prompt_tokens=st.none() | st.integers(0, 500))  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(default=placements, rules=st.lists(rules, max_size=5))
def test_a_policy_survives_its_json(default, rules, tmp_path_factory):
    policy = FusionPolicy(tuple(default), tuple(rules))
    assert FusionPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    path = policy.save(tmp_path_factory.mktemp("policy") / "p.json")
    assert FusionPolicy.load(path) == policy


@pytest.mark.parametrize("data, words", [
    ({"rules": []}, "'default' placement"),
    ({"default": []}, "non-empty list"),
    ({"default": [3, 3]}, "names a layer twice"),
    ({"default": "12"}, "must be a list"),
    ({"default": [12], "extra": 1}, "unknown fusion policy field(s) ['extra']"),
    ({"default": [12], "rules": [{"task": "pope"}]}, "no fusion_at"),
    ({"default": [12], "rules": [{"fusion_at": [12], "when": "x"}]}, "unknown field(s) ['when']"),
    ({"default": [12], "rules": [{"fusion_at": [12], "min_images": -1}]}, "min_images=-1"),
])  # fmt: skip
def test_bad_policies_are_refused_in_one_line(data, words):
    with pytest.raises(DPVRError) as err:
        FusionPolicy.from_dict(data)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_bad_files_and_models_are_refused_in_one_line(lf, tmp_path):
    model, _, _ = lf
    (tmp_path / "broken.json").write_text("{default: ")
    for path, words in ((tmp_path / "nope.json", "no fusion policy at"), (tmp_path / "broken.json", "not valid JSON")):
        with pytest.raises(DPVRError, match=words):
            FusionPolicy.load(path)
    with pytest.raises(DPVRError, match=r"names layers \[3\] outside the deep layers \[9, 16\)"):
        FusionPolicy((3, 12)).check_model(model)
    with pytest.raises(DPVRError, match="this model is stock"):
        FusionPolicy((12,)).check_model(build_tiny_model(seed=0)[0])
    with model.routing(mode="vtw"):
        with pytest.raises(DPVRError, match="this model is vtw"):
            POLICY.check_model(model)


# ----------------------------------------------------------------------------- running it
def test_eval_under_a_policy_equals_each_family_alone_under_its_placement(lf):
    model, processor, data = lf
    families = {"pope": (10, 13), "count": (12,), "spatial": (15,)}
    kw = dict(limit_per_family=4, progress=False)
    got = evaluate(model, processor, data, batch_size=4, families=list(families), policy=POLICY, **kw)
    alone = {}
    for family, placement in families.items():
        with model.routing(fusion_at=placement):
            alone.update(evaluate(model, processor, data, batch_size=3, families=[family], **kw)["replies"])
    assert len(alone) == len(got["replies"]) == 12 and all(got["replies"][k] == v for k, v in alone.items())
    family_of = {s["id"]: s["meta"]["family"] for s in load_split(data, "test")}
    assert all(got["placements"][k] == list(families[family_of[k]]) for k in alone)
    assert got["fusion_policy"] == POLICY.to_dict()
    # the placements matter: the same questions all under the default answer otherwise somewhere
    default = evaluate(model, processor, data, batch_size=4, families=["pope", "count"], **kw)["replies"]
    assert any(default[k] != got["replies"][k] for k in default), "every placement gave the same replies"


def _items(n: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = lambda: Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))  # noqa: E731
    questions = ["which digit is in the top left cell ?", "is there a 7 ?", "how many digits are there ?"]
    return [(questions[i % 3], {"max_new_tokens": 3}, [image() for _ in range(1 + (i % 4 == 3))]) for i in range(n)]


def test_a_batch_mixing_placements_equals_its_rows_alone_cached_and_recomputed(lf):
    model, processor, _ = lf
    items = _items(6)
    places = [POLICY.pick(Request(("pope", "count", "mme")[i % 3], len(it[2]), 0)) for i, it in enumerate(items)]
    assert len(set(places)) >= 3
    batched = by_placement(model, places, lambda idx: generate_texts(model, processor, [items[i] for i in idx], 8))
    recomputed = by_placement(model, places, lambda idx: generate_texts(model, processor, [items[i] for i in idx], 8,
                                                                         use_cache=False))  # fmt: skip
    for i, (item, placement) in enumerate(zip(items, places)):
        with model.routing(fusion_at=placement):
            assert generate_texts(model, processor, [item], 1) == [batched[i]], f"request {i}"
    assert recomputed == batched
    scored = [(q, " 7", imgs) for q, _, imgs in items]
    logps = by_placement(model, places, lambda idx: continuation_logprobs(model, processor, [scored[i] for i in idx]))
    for i, placement in enumerate(places):
        with model.routing(fusion_at=placement):
            assert continuation_logprobs(model, processor, [scored[i]])[0][0] == pytest.approx(logps[i][0], abs=1e-4)


# ----------------------------------------------------------------------------- the commands
def test_commands_refuse_a_policy_they_cannot_run_in_one_line(tiny_checkpoint, tmp_path, capsys, digit_bench):
    POLICY.save(tmp_path / "policy.json")
    data = digit_bench(3, train=2, val=2, test=6, existence=2, all=2)
    rc = main(["eval", "--model", str(tiny_checkpoint), "--data", str(data), "--fusion-policy", str(tmp_path / "policy.json"),
               "--out", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and err == "dpvr eval: error: DPVRError: a fusion policy places LF fusion layers; this model is " \
        "stock: use an LF checkpoint or --mode lf"
    _image(tmp_path / "img.png")
    rc = main(["generate", "--image", str(tmp_path / "img.png"), "--prompt", "hi", "--task", "pope"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "--task is read by --fusion-policy's rules; give --fusion-policy too" in err


def _image(path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)


def test_generate_answers_under_the_placement_its_task_picks(tiny_checkpoint, tmp_path, capsys):
    _image(tmp_path / "img.png")
    POLICY.save(tmp_path / "policy.json")
    argv = ["generate", "--model", str(tiny_checkpoint), "--image", str(tmp_path / "img.png"), "--prompt", "is there a 7 ?",
            "--mode", "lf", "--split-layer", "9", "--max-new-tokens", "2", "--fusion-policy", str(tmp_path / "policy.json")]  # fmt: skip
    assert main([*argv, "--task", "pope"]) == 0
    assert "[lf s=9 fusion_at=10,13 D=1]" in capsys.readouterr().out
    assert main([*argv, "--task", "mme"]) == 0
    assert "[lf s=9 fusion_at=15 D=1]" in capsys.readouterr().out


# ----------------------------------------------------------------------------- training across placements
def _train(placements, fusion_at, steps: int, out_dir):
    """(fusion_at seen by each forward, the last step's side-branch gradient) of DPVRTrainer on the 6-layer
    tiny LLaVA in LF (split 3), 2 micro-batches per step."""
    from test_loss_scaling import collate, samples
    from tiny import tiny_llava
    from transformers import TrainerCallback, TrainingArguments

    from dpvr.train.trainer import DPVRTrainer

    torch.manual_seed(1)
    model = convert(tiny_llava(layers=6, seed=0), DPVRConfig(mode="lf", split_layer=3, side_init="random", fusion_at=fusion_at))
    seen, forward = {"fusion_at": []}, model.forward

    def spy(*args, **kwargs):
        seen["fusion_at"].append(model.dpvr_config.fusion_at)
        return forward(*args, **kwargs)

    model.forward = spy

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            seen["grad"] = torch.cat([p.grad.flatten() for p in model.side_branch.parameters()]).clone()

    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=steps, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0)  # fmt: skip
    DPVRTrainer(model=model, args=args, train_dataset=samples(), data_collator=collate, callbacks=[Record()],
                placements=placements).train()
    assert model.dpvr_config.fusion_at == tuple(fusion_at)  # the model's own routing is back after training
    return seen


def test_training_cycles_the_placements_one_per_step_each_as_that_placement_trains(tmp_path):
    places = ((3,), (4, 5), (5,))
    seen = _train(places, (4, 5), 3, tmp_path / "policy")
    assert seen["fusion_at"] == [(3,), (3,), (4, 5), (4, 5), (5,), (5,)]
    # step 0 of the policy run is a plain run under its first placement, gradient for gradient
    first = _train(places, (), 1, tmp_path / "p1")["grad"]
    plain = _train(None, (3,), 1, tmp_path / "plain")["grad"]
    assert first.norm() > 0 and torch.allclose(first, plain, rtol=0, atol=1e-7)


def _analysis(path, curves: dict) -> None:
    review = {f: {"cost": c, "cost_sem": [0.01] * len(c)} for f, c in curves.items()}
    path.write_text(json.dumps({"recommendation": {"split": 3}, "attention_truth": {"late_review": review}}))


def test_a_policy_from_one_analysis_places_each_family_where_its_masking_curve_hurts(tmp_path, capsys):
    from dpvr.fusion_policy import main as build

    flat = [0.0] * 6
    _analysis(tmp_path / "a.json", {"all": [0.5, 0.1, 0, 0, 0.3, 0], "count": [0.5, 0, 0, 0.2, 0, 0],
                                    "pope": [0.5, 0, 0, 0, 0.4, 0.02], "text": flat})  # fmt: skip
    policy = FusionPolicy.from_analysis(tmp_path / "a.json", split_layer=3)
    assert policy == FusionPolicy((4,), (Rule((3,), task="count"),))  # pope's is the default's; text has none
    assert build([str(tmp_path / "a.json"), "--split-layer", "3", "--out", str(tmp_path / "p.json")]) == 0
    assert FusionPolicy.load(tmp_path / "p.json") == policy
    _analysis(tmp_path / "none.json", {"all": flat})
    (tmp_path / "old.json").write_text(json.dumps({"recommendation": {"split": 3}}))
    for name, words in (("none.json", "nothing for a fusion policy to place"), ("old.json", "no per-family masking")):
        with pytest.raises(SystemExit):
            build([str(tmp_path / name), "--split-layer", "3"])
        assert words in capsys.readouterr().err
