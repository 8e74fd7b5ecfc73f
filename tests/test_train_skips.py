"""dpvr train with bad samples skipped (--on_error skip) and the reported train_loss across a resume."""
from __future__ import annotations

import json

import pytest

from dpvr.train.cli import train

N_GOOD, N_BAD, BATCH = 2, 6, 2  # 4 batches of 2: the 2 good samples leave at least 2 batches wholly bad


@pytest.fixture(scope="module")
def data(tiny_checkpoint, tmp_path_factory, digit_bench):
    root = tmp_path_factory.mktemp("skips")
    bench = digit_bench(4, train=4, val=2, test=2, existence=2, all=2)
    samples = json.loads((bench / "train.json").read_text())
    good = [s for s in samples if "image" in s][:N_GOOD]
    bad = [{**good[0], "id": f"bad-{i}", "image": f"train/missing-{i}.png"} for i in range(N_BAD)]
    path = root / "mixed.json"
    path.write_text(json.dumps(good + bad))
    return tiny_checkpoint, path, bench


def run(data, out, *extra) -> dict:
    ckpt, path, bench = data
    res = train(["--model", str(ckpt), "--data", str(path), "--images", str(bench / "images"), "--mode", "lf",
                 "--split_layer", "6", "--per_device_train_batch_size", str(BATCH), "--on_error", "skip",
                 "--output_dir", str(out), "--disable_tqdm", "true", "--save_steps", str(10**6), *extra])  # fmt: skip
    return json.loads((out / "final" / "run.json").read_text()) | res


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counts_samples_once_over_epochs_and_workers_and_survives_wholly_bad_batches(data, tmp_path, workers):
    record = run(data, tmp_path, "--num_train_epochs", "2", "--dataloader_num_workers", str(workers))
    assert record["skipped_samples"] == {"missing_image": N_BAD}, record["skipped_samples"]
    # every step trained on real samples: 2 epochs of the good samples, whole bad batches replaced
    assert 2 <= record["steps"] <= 2 * N_GOOD, record["steps"]
    assert record["train_loss"] == record["train_loss"] and record["train_loss"] > 0  # a finite, real loss


def test_train_loss_after_resume_equals_the_uninterrupted_runs(tiny_checkpoint, tmp_path, digit_bench):


    bench = digit_bench(3, train=6, val=2, test=2, existence=2, all=2)
    common = ["--model", str(tiny_checkpoint), "--data", str(bench / "train.json"), "--mode", "lf", "--split_layer", "6",
              "--per_device_train_batch_size", "4", "--save_steps", "2", "--logging_steps", "1", "--max_steps", "6",
              "--disable_tqdm", "true"]  # fmt: skip
    straight = train([*common, "--output_dir", str(tmp_path / "straight")])
    resumed = train([*common, "--output_dir", str(tmp_path / "resumed"),
                     "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-4")])  # fmt: skip
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-9), (resumed, straight)


def test_a_run_where_every_sample_is_skipped_fails_and_writes_no_final(data, tmp_path):
    from dpvr.errors import DPVRError

    ckpt, path, bench = data
    bad = [s for s in json.loads(path.read_text()) if s["id"].startswith("bad-")]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DPVRError) as exc:
        run((ckpt, tmp_path / "bad.json", bench), tmp_path / "out", "--num_train_epochs", "1")
    msg = str(exc.value)
    assert "\n" not in msg and "no training step ran" in msg and f"{N_BAD} missing_image" in msg, msg
    assert not (tmp_path / "out" / "final").exists()
