"""Length-grouped training batches (`--train_sampling_strategy group_by_length`): less padding, a
replayable order, exact resume in a later epoch, and a held-out loss that ignores the training order."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpvr.data.llava_json import IMAGE_LENGTH_GUESS, LlavaJsonDataset
from dpvr.train.cli import train
from dpvr.train.sampling import LengthGroupedSampler


def padded(order: list[int], lengths: list[int], batch: int) -> int:
    """Tokens the model runs over when each batch is padded to its longest sample."""
    return sum(len(b) * max(lengths[i] for i in b) for b in (order[k : k + batch] for k in range(0, len(order), batch)))


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 400), min_size=1, max_size=300), batch=st.integers(1, 8),
       seed=st.integers(0, 5), epoch=st.integers(0, 3))  # fmt: skip
def test_every_index_once_and_the_order_is_a_function_of_seed_and_epoch(lengths, batch, seed, epoch):
    a, b = LengthGroupedSampler(lengths, batch, seed), LengthGroupedSampler(lengths, batch, seed)
    a.set_epoch(epoch), b.set_epoch(epoch)
    order = list(a)
    assert sorted(order) == list(range(len(lengths)))
    assert order == list(b), "the same seed and epoch must replay the same batches (exact resume)"


def test_grouping_pads_less_than_random_batches_and_epochs_differ():
    gen = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(200, 300, (1600,), generator=gen)] + [30] * 50
    sampler = LengthGroupedSampler(lengths, 16, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    random = torch.randperm(len(lengths), generator=gen).tolist()
    assert padded(first, lengths, 16) < 0.95 * padded(random, lengths, 16)


def test_length_estimate_ranks_image_samples_above_text_and_survives_malformed_ones():
    samples = [{"id": "t", "conversations": [{"from": "human", "value": "a b c"}, {"from": "gpt", "value": "d"}]},
               {"id": "i", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "y"}]},
               {"id": "bad", "conversations": "not a list"}]  # fmt: skip
    ds = LlavaJsonDataset(samples, None, processor=None)
    assert ds.lengths == [4, 2 + 1 + IMAGE_LENGTH_GUESS, 0]


@pytest.fixture(scope="module")
def bench(digit_bench):
    return digit_bench(5, train=10, val=2, test=2, existence=2, all=2)


def run(tiny_checkpoint, bench, out, *extra) -> dict:
    """`dpvr train`'s result and its run.json (steps, log history)."""
    return json.loads((Path(train(["--model", str(tiny_checkpoint), "--data", str(bench / "train.json"), "--mode", "lf",
                  "--split_layer", "6", "--per_device_train_batch_size", "4", "--logging_steps", "1",
                  "--train_sampling_strategy", "group_by_length", "--disable_tqdm", "true", "--eval_limit", "6",
                  "--output_dir", str(out), *extra])["final"]) / "run.json").read_text())  # fmt: skip


def digest(out) -> str:
    return (out / "trainable_digest_rank0.txt").read_text().strip()


def test_resume_in_a_later_epoch_replays_the_grouped_batches(tiny_checkpoint, bench, tmp_path):
    n = len(json.loads((bench / "train.json").read_text()))
    per_epoch = -(-n // 4)
    at = per_epoch + 1  # a checkpoint inside the second epoch
    common = ("--num_train_epochs", "2", "--save_steps", str(at), "--eval_strategy", "steps", "--eval_steps", str(at))
    straight = run(tiny_checkpoint, bench, tmp_path / "straight", *common)
    resumed = run(tiny_checkpoint, bench, tmp_path / "resumed", *common,
                  "--resume_from_checkpoint", str(tmp_path / "straight" / f"checkpoint-{at}"))  # fmt: skip
    assert straight["steps"] == 2 * per_epoch > at > per_epoch
    assert digest(tmp_path / "resumed") == digest(tmp_path / "straight"), "resumed weights differ from the uninterrupted run"
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-9)
    assert [h["eval_loss"] for h in resumed["log_history"] if "eval_loss" in h][-1] == pytest.approx(
        [h["eval_loss"] for h in straight["log_history"] if "eval_loss" in h][-1], rel=1e-6)


def test_held_out_loss_does_not_depend_on_the_training_order(tiny_checkpoint, bench, tmp_path):
    # no training step (learning rate 0): the held-out loss at step 0 is the model's, whatever the sampler
    common = ("--max_steps", "1", "--learning_rate", "0", "--eval_strategy", "steps", "--eval_steps", "1",
              "--eval_on_start", "true", "--per_device_eval_batch_size", "3", "--save_steps", "100")  # fmt: skip
    grouped = run(tiny_checkpoint, bench, tmp_path / "g", *common)
    plain = run(tiny_checkpoint, bench, tmp_path / "p", *common, "--train_sampling_strategy", "random")
    losses = lambda r: [h["eval_loss"] for h in r["log_history"] if "eval_loss" in h]  # noqa: E731
    assert losses(grouped) == losses(plain) and len(losses(plain)) == 2


@pytest.mark.parametrize("cache", [False, True], ids=["stock", "shared-stack-cache"])
def test_a_batch_of_text_only_samples_trains_without_touching_the_side_branch(tiny_checkpoint, bench, tmp_path, cache):
    # grouped batches put text-only samples together; they never reach the side branch, so the
    # step must run (it used to fail: no tensor requiring grad) and leave its weights unchanged
    texts = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                                                {"from": "gpt", "value": str(2 * i)}]} for i in range(4)]  # fmt: skip
    data = tmp_path / "text-only.json"
    data.write_text(json.dumps(texts))
    extra = ["--data", str(data), "--images", str(bench / "images"), "--max_steps", "2", "--save_steps", "100",
             *(["--shared_stack_cache", str(tmp_path / "cache")] if cache else [])]  # fmt: skip
    trained = run(tiny_checkpoint, bench, tmp_path / "trained", *extra)
    run(tiny_checkpoint, bench, tmp_path / "untrained", *extra, "--learning_rate", "0")
    assert trained["steps"] == 2 and trained["train_loss"] == trained["train_loss"]
    assert digest(tmp_path / "trained") == digest(tmp_path / "untrained")
