"""`dpvr train` under every launcher either runs truly distributed or refuses in one line: never one
process while several were asked for, never several independent models."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dpvr.data.digit_scenes import ensure_benchmark
from dpvr.errors import DPVRError
from dpvr.train.launch import check_launch, launched_world

ENV = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_RANK"))}
ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_world_is_read_from_every_launchers_variables():
    assert launched_world({}) == 1
    assert launched_world({"WORLD_SIZE": "4"}) == 4
    assert launched_world({"OMPI_COMM_WORLD_SIZE": "2"}) == 2
    assert launched_world({"PMI_SIZE": "3"}) == 3


def test_mismatches_are_refused_in_one_line():
    check_launch(1, False, {})  # a plain run
    check_launch(2, True, {"WORLD_SIZE": "2"})  # torchrun, distributed
    with pytest.raises(DPVRError, match="accelerate launched one process") as e:
        check_launch(1, False, {"ACCELERATE_USE_CPU": "True"})
    assert "\n" not in str(e.value)
    with pytest.raises(DPVRError, match="launched as 2 processes but the Trainer runs 1"):
        check_launch(1, False, {"WORLD_SIZE": "2"})
    with pytest.raises(DPVRError, match="launched as 2 processes"):
        check_launch(1, False, {"OMPI_COMM_WORLD_SIZE": "2"})


@pytest.fixture(scope="module")
def world(tiny_checkpoint, tmp_path_factory):
    data = ensure_benchmark(tmp_path_factory.mktemp("bench"), seed=3, scenes={"train": 4, "val": 2, "test": 2, "existence": 2, "all": 2}, progress=False)
    return tiny_checkpoint, data


def train_args(world, out) -> list[str]:
    root, data = world
    return ["train", "--model", str(root), "--data", str(data / "train.json"), "--mode", "lf", "--split_layer", "6",
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--disable_tqdm", "true",
            "--output_dir", str(out)]  # fmt: skip


def accelerate(*args) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *args]


def test_accelerate_cpu_with_two_processes_is_refused_not_run_as_one(world, tmp_path):
    cmd = accelerate("--num_processes", "2", "--cpu", "-m", "dpvr.cli", *train_args(world, tmp_path))
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "accelerate launched one process" in res.stderr, res.stderr[-2000:]
    assert not list(tmp_path.glob("trainable_digest_rank*.txt")), "it trained anyway"


@pytest.mark.e2e
def test_accelerate_multi_gpu_launch_trains_one_model_on_two_cpu_processes(world, tmp_path):
    cmd = accelerate("--multi_gpu", "--num_processes", "2", "--main_process_port", "29571", "-m", "dpvr.cli",
                     *train_args(world, tmp_path), "--ddp_backend", "gloo")  # fmt: skip
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    digests = [(tmp_path / f"trainable_digest_rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1], "the two ranks ended with different weights"
