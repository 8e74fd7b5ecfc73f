"""`dpvr train --distill_weight W --distill_temperature T` and `--side_warmup_steps N --side_warmup_lr_scale s`
as a user runs them: W = 0 is today's training bit for bit, the learning rate follows the two stages step by
step, and a run resumed from a checkpoint inside the warm-up stage ends with the uninterrupted run's weights.
Every run in its own process, as in tests/test_train.py's resume test."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_train import _train_process, args, digest, world  # noqa: F401  (world: the fixture)

LR, STEPS, WARMUP, SCALE, SECOND_WARMUP = 1e-3, 8, 3, 0.1, 2
RECIPE = ["--distill_weight", "0.5", "--distill_temperature", "2", "--side_warmup_steps", str(WARMUP),
          "--side_warmup_lr_scale", str(SCALE), "--warmup_steps", str(SECOND_WARMUP), "--lr_scheduler_type", "cosine",
          "--learning_rate", str(LR), "--max_steps", str(STEPS), "--save_total_limit", "10"]  # fmt: skip


def test_distill_weight_0_is_todays_training_bit_for_bit(world, tmp_path):  # noqa: F811
    runs = {name: tmp_path / name for name in ("plain", "w0", "w05")}
    _train_process(args(world, runs["plain"], "--max_steps", "4"))
    _train_process(args(world, runs["w0"], "--max_steps", "4", "--distill_weight", "0", "--distill_temperature", "3"))
    _train_process(args(world, runs["w05"], "--max_steps", "4", "--distill_weight", "0.5"))
    assert digest(runs["w0"]) == digest(runs["plain"]), "--distill_weight 0 changed the trained weights"
    assert digest(runs["w05"]) != digest(runs["plain"]), "--distill_weight 0.5 trained the same weights as no distillation"


def expected_lr(step: int) -> float:
    """The rate of optimizer step `step` (0-based): SCALE x LR for WARMUP steps, then HF's cosine schedule with
    SECOND_WARMUP linear warmup steps over the remaining STEPS - WARMUP steps."""
    if step < WARMUP:
        return SCALE * LR
    k, rest = step - WARMUP, STEPS - WARMUP
    if k < SECOND_WARMUP:
        return LR * k / SECOND_WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (k - SECOND_WARMUP) / (rest - SECOND_WARMUP)))


@pytest.fixture(scope="module")
def staged(world, tmp_path_factory):  # noqa: F811
    """(the uninterrupted run's output dir, a run resumed from its step-2 checkpoint, inside the warm-up stage)."""
    root = tmp_path_factory.mktemp("staged")
    straight, resumed = root / "straight", root / "resumed"
    _train_process(args(world, straight, *RECIPE))
    _train_process(args(world, resumed, *RECIPE, "--resume_from_checkpoint", str(straight / "checkpoint-2")))
    return straight, resumed


def test_the_learning_rate_follows_the_warm_up_stage_then_the_runs_schedule(staged):
    log = json.loads(Path(staged[0], "final", "run.json").read_text())["log_history"]
    logged = {e["step"]: e["learning_rate"] for e in log if "learning_rate" in e}  # the rate step e["step"] ran at
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step, lr in logged.items():
        assert lr == pytest.approx(expected_lr(step - 1), rel=1e-9, abs=1e-15), f"step {step}: rate {lr}"


def test_a_resumed_distilled_and_staged_run_ends_with_the_uninterrupted_weights(staged):
    straight, resumed = staged
    assert digest(resumed) == digest(straight), "resumed weights differ from the uninterrupted run"
    log = json.loads(Path(resumed, "final", "run.json").read_text())["log_history"]
    after = {e["step"]: e["learning_rate"] for e in log if "learning_rate" in e}
    # steps 1-2 come from the checkpoint's trainer state, 3 on from the resumed process's scheduler
    assert sorted(after) == list(range(1, STEPS + 1))
    assert all(lr == pytest.approx(expected_lr(s - 1), rel=1e-9, abs=1e-15) for s, lr in after.items())


def test_every_trainer_default_names_a_training_arguments_field():
    """set_defaults takes any key, and HfArgumentParser drops those that are no field: a default written for
    a name transformers no longer has (warmup_ratio, gone in 5.x) would be dropped without a word."""
    import dataclasses

    from transformers import TrainingArguments

    from dpvr.train.args import TRAINING_DEFAULTS

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert set(TRAINING_DEFAULTS) <= fields, sorted(set(TRAINING_DEFAULTS) - fields)
