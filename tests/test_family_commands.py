"""The commands on the routed families beyond LLaVA-1.5, one tiny checkpoint each with its real processor:
LLaVA-NeXT (anyres processor, image_sizes, newline tokens), Qwen2-VL and Qwen2.5-VL (multimodal rope,
image_grid_thw, mm_token_type_ids) through `dpvr generate`, `eval`, `analyze`, `train` and `bench`, with the
same assertions for every family. The Qwen2-VL processor needs torchvision for its video half: the README's
suite skips the Qwen families where torchvision is absent (a CPU install), and `.ci/lmms.sh` runs this file
in the environment that has it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from families import save_next_checkpoint, save_qwen_checkpoint
from PIL import Image

from dpvr.cli import main
from dpvr.train.cli import train

FAMILIES = ["llava_next", "qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def world(request, tmp_path_factory, digit_bench):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    if family == "llava_next":
        ckpt = save_next_checkpoint(root / "model")
    else:
        pytest.importorskip("torchvision", reason="Qwen2-VL's processor needs torchvision (.ci/lmms.sh runs this file)")
        ckpt = save_qwen_checkpoint(root / "model", family)
    data = digit_bench(3, train=4, val=1, test=3, existence=2, all=2)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "img.png")
    return root, ckpt, data


def test_generate_compare(world, capsys):
    root, ckpt, _ = world
    rc = main(["generate", "--model", str(ckpt), "--image", str(root / "img.png"), "--prompt", "is there a 7 ?",
               "--mode", "lf", "--split-layer", "3", "--compare", "--max-new-tokens", "3"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "lf s=3 K=1 D=1" in out and "vanilla" in out


def test_eval_routed_and_vanilla(world, tmp_path, capsys):
    _, ckpt, data = world
    for mode in ("vanilla", "kv", "fastv"):
        extra = [] if mode == "vanilla" else ["--mode", mode, "--split-layer", "3", "--fastv-layer", "1"]
        rc = main(["eval", "--model", str(ckpt), "--data", str(data), *extra, "--families", "pope,count",
                   "--out", str(tmp_path / mode)])  # fmt: skip
        assert rc == 0, capsys.readouterr()
        result = json.loads((tmp_path / mode / "eval.json").read_text())
        assert {"pope", "count"} <= set(result["scores"]), result["scores"]


def test_analyze(world, tmp_path, capsys):
    _, ckpt, data = world
    rc = main(["analyze", "--model", str(ckpt), "--data", str(data / "test.json"), "--images", str(data / "images"),
               "-n", "3", "--mask-samples", "2", "--batch-size", "2", "--out", str(tmp_path), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().out
    result = json.loads((tmp_path / "analysis.json").read_text())
    assert result["curves"]["num_layers"] == 6 and 1 <= result["recommendation"]["split"] < 6


def test_train_lf_side_branch(world, tmp_path):
    _, ckpt, data = world
    out = train(["--model", str(ckpt), "--data", str(data / "train.json"), "--mode", "lf", "--split_layer", "3",
                 "--per_device_train_batch_size", "2", "--max_steps", "2", "--logging_steps", "1",
                 "--output_dir", str(tmp_path), "--disable_tqdm", "true"])  # fmt: skip
    assert Path(out["final"], "dpvr_adapter.json").exists()
    rc = main(["eval", "--model", str(ckpt), "--adapter", str(out["final"]), "--data", str(data), "--families", "pope",
               "--out", str(tmp_path / "eval")])  # fmt: skip
    assert rc == 0


def test_bench_and_flops_on_the_checkpoint_shape(world, tmp_path):
    _, ckpt, _ = world
    rc = main(["bench", "--preset", str(ckpt), "--modes", "vanilla,lf", "--text-lens", "8", "--batches", "1",
               "--repeats", "1", "--new-tokens", "2", "--recompute-text-len", "8", "--no-train-step",
               "--split-layer", "3", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0 and (tmp_path / "bench.json").exists()
