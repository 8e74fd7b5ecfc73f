"""`dpvr train` under every launcher either runs truly distributed or refuses in one line: never one
process while several were asked for, never several independent models."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpvr.data.digit_scenes import ensure_benchmark
from dpvr.errors import DPVRError
from dpvr.train.launch import check_launch, check_sharding, launched_world, sharding_asked

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


def test_sharding_asked_but_not_set_up_is_refused_in_one_line():
    assert sharding_asked(None, None, {}) is None
    assert sharding_asked(None, None, {"ACCELERATE_USE_FSDP": "true"}) == "FSDP"
    assert sharding_asked("full_shard", None, {}) == "FSDP"
    assert sharding_asked(None, "zero3.json", {}) == "DeepSpeed"
    assert sharding_asked(None, None, {"ACCELERATE_USE_DEEPSPEED": "true"}) == "DeepSpeed"
    check_sharding(None, False, False)  # DDP or one process, as asked
    check_sharding("FSDP", True, False)
    check_sharding("DeepSpeed", False, True)
    with pytest.raises(DPVRError, match="FSDP was asked for but the Trainer runs without it") as e:
        check_sharding("FSDP", False, False)
    assert "\n" not in str(e.value)
    with pytest.raises(DPVRError, match="DeepSpeed was asked for"):
        check_sharding("DeepSpeed", False, False)


@pytest.fixture(scope="module")
def world(tiny_checkpoint, tmp_path_factory):
    data = ensure_benchmark(tmp_path_factory.mktemp("bench"), seed=3, scenes={"train": 4, "val": 2, "test": 2, "existence": 2, "all": 2}, progress=False)
    return tiny_checkpoint, data


def train_args(world, out, steps: int = 1, batch: int = 2, save_steps: int | None = None) -> list[str]:
    root, data = world
    save = ["--save_strategy", "steps", "--save_steps", str(save_steps)] if save_steps else ["--save_strategy", "no"]
    return ["train", "--model", str(root), "--data", str(data / "train.json"), "--mode", "lf", "--split_layer", "6",
            "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), *save,
            "--disable_tqdm", "true", "--output_dir", str(out)]  # fmt: skip


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


def side_branch(out) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "side_branch.safetensors")


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The side branch of 2 steps in one process at batch 4: what 2 ranks x batch 2 must save."""
    out = tmp_path_factory.mktemp("one")
    subprocess.run([sys.executable, "-m", "dpvr.cli", *train_args(world, out, steps=2, batch=4), "--use_cpu", "true"],
                   env=ENV, check=True, capture_output=True)  # fmt: skip
    return side_branch(out)


def assert_whole_and_loads(out, want: dict[str, torch.Tensor]) -> None:
    """The saved side branch is the one-process one (gathered whole from the ranks, not a shard or an
    empty ZeRO-3 placeholder), it loads with from_pretrained, and both ranks ended with the same weights."""
    from dpvr import DPVRForConditionalGeneration

    got = side_branch(out)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    loaded = DPVRForConditionalGeneration.from_pretrained(out / "final")
    for k, v in loaded.side_branch.state_dict().items():
        assert torch.equal(v, got[f"side_branch.{k}"]), k
    digests = [(out / f"trainable_digest_rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1], "the two ranks ended with different weights"


@pytest.mark.e2e
def test_accelerate_fsdp_on_cpu_is_refused_not_run_as_ddp(world, tmp_path):
    cmd = accelerate("--num_processes", "2", "--main_process_port", "29572", "--use_fsdp", "--fsdp_version", "2",
                     "-m", "dpvr.cli", *train_args(world, tmp_path), "--ddp_backend", "gloo", "--use_cpu", "true")  # fmt: skip
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "FSDP was asked for but the Trainer runs without it" in res.stderr, res.stderr[-2000:]
    assert not list(tmp_path.glob("trainable_digest_rank*.txt")), "it trained anyway"


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not in the pinned stack (docs/train.md, Sharded training)")


def sharded(kind: str, argv: list[str], folder: Path, port: int) -> subprocess.CompletedProcess:
    """`dpvr train argv` on 2 CPU processes (gloo) under kind: fsdp2 (through tests/fsdp_on_cpu.py, which
    lifts accelerate's GPU-only gate), zero2 or zero3 (every parameter partitioned: ZeRO-3 keeps ones under
    1e5 elements whole by default, which is all of the tiny model's)."""
    if kind == "fsdp2":
        shim = str(Path(__file__).with_name("fsdp_on_cpu.py"))
        opts, entry, env = ["--use_fsdp", "--fsdp_version", "2"], [shim, *argv, "--use_cpu", "true"], ENV
    else:
        zero = {"stage": int(kind[-1]), **({"stage3_param_persistence_threshold": 0} if kind == "zero3" else {})}
        config = folder / f"{kind}.json"
        config.write_text(json.dumps({"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
                                      "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                                      "gradient_clipping": "auto"}))  # fmt: skip
        opts = ["--use_deepspeed", "--deepspeed_config_file", str(config), "--zero3_init_flag", "false"]
        entry, env = ["-m", "dpvr.cli", *argv], {**ENV, "DS_ACCELERATOR": "cpu"}
    cmd = accelerate("--num_processes", "2", "--main_process_port", str(port), *opts, *entry, "--ddp_backend", "gloo")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["fsdp2", pytest.param("zero2", marks=needs_deepspeed),
                                  pytest.param("zero3", marks=needs_deepspeed)])  # fmt: skip
def test_sharded_training_on_two_cpu_processes_saves_the_one_process_side_branch(world, one_process, tmp_path, kind):
    # 2 ranks x batch 2 against 1 process x batch 4: the same samples in each step, so the same side branch
    res = sharded(kind, train_args(world, tmp_path / "out", steps=2, batch=2), tmp_path, 29574)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "find_unused_parameters" not in res.stderr, "it ran as DDP"
    assert not (tmp_path / "out" / "final" / "latest").exists(), "DeepSpeed's whole checkpoint landed in final/"
    assert_whole_and_loads(tmp_path / "out", one_process)


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["fsdp2", pytest.param("zero3", marks=needs_deepspeed)])
def test_sharded_resume_gives_the_uninterrupted_run_and_checks_the_routing(world, tmp_path, kind):
    straight, resumed, changed = tmp_path / "straight", tmp_path / "resumed", tmp_path / "changed"
    res = sharded(kind, train_args(world, straight, steps=2, save_steps=1), tmp_path, 29575)
    assert res.returncode == 0, res.stderr[-3000:]
    for out in (resumed, changed):
        shutil.copytree(straight / "checkpoint-1", out / "checkpoint-1")
    res = sharded(kind, [*train_args(world, resumed, steps=2, save_steps=1), "--resume_from_checkpoint", "true"],
                  tmp_path, 29576)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = side_branch(straight), side_branch(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want), "the resumed side branch differs"
    record = [json.loads((out / "final" / "run.json").read_text())["train_loss"] for out in (straight, resumed)]
    assert record[0] == pytest.approx(record[1], rel=1e-6), "train_loss is not the whole run's after the resume"
    argv = [*train_args(world, changed, steps=2, save_steps=1), "--resume_from_checkpoint", "true"]
    argv[argv.index("--split_layer") + 1] = "5"
    res = sharded(kind, argv, tmp_path, 29577)
    assert res.returncode != 0
    assert "routing config changed {'split_layer': (6, 5)}" in res.stderr, res.stderr[-2000:]
