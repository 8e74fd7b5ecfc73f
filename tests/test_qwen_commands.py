"""The commands on tiny Qwen2-VL and Qwen2.5-VL checkpoints with their real processor (multimodal
rope, image_grid_thw, mm_token_type_ids): `dpvr generate`, `eval`, `analyze`, `train`. The Qwen2-VL
processor needs torchvision for its video half: the README's suite skips this file where torchvision
is absent (a CPU install), and `.ci/lmms.sh` runs it in the environment that has it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torchvision", reason="Qwen2-VL's processor needs torchvision (.ci/lmms.sh runs this file)")

from families import save_qwen_checkpoint  # noqa: E402

from dpvr.cli import main  # noqa: E402
from dpvr.data.digit_scenes import ensure_benchmark  # noqa: E402
from dpvr.train.cli import train  # noqa: E402


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def world(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = save_qwen_checkpoint(root / "model", request.param)
    data = ensure_benchmark(root / "bench", seed=3, scenes={"train": 4, "val": 1, "test": 3, "existence": 2, "all": 2},
                            progress=False)  # fmt: skip
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "img.png")
    return root, ckpt, data


def test_generate_eval_analyze_train(world, tmp_path, capsys):
    root, ckpt, data = world
    rc = main(["generate", "--model", str(ckpt), "--image", str(root / "img.png"), "--prompt", "is there a 7 ?",
               "--mode", "lf", "--split-layer", "3", "--compare", "--max-new-tokens", "3"])  # fmt: skip
    assert rc == 0, capsys.readouterr()
    for mode in ("vanilla", "kv", "fastv"):
        extra = [] if mode == "vanilla" else ["--mode", mode, "--split-layer", "3", "--fastv-layer", "1"]
        rc = main(["eval", "--model", str(ckpt), "--data", str(data), *extra, "--families", "pope,count",
                   "--out", str(tmp_path / mode)])  # fmt: skip
        assert rc == 0, capsys.readouterr()
        assert {"pope", "count"} <= set(json.loads((tmp_path / mode / "eval.json").read_text())["scores"])
    rc = main(["analyze", "--model", str(ckpt), "--data", str(data / "test.json"), "--images", str(data / "images"),
               "-n", "3", "--mask-samples", "2", "--batch-size", "2", "--out", str(tmp_path / "an"), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr()
    out = train(["--model", str(ckpt), "--data", str(data / "train.json"), "--mode", "lf", "--split_layer", "3",
                 "--per_device_train_batch_size", "2", "--max_steps", "2", "--logging_steps", "1",
                 "--output_dir", str(tmp_path / "train"), "--disable_tqdm", "true"])  # fmt: skip
    assert Path(out["final"], "dpvr_adapter.json").exists()
