"""`dpvr train-tiny` on a toy benchmark: it runs every stage, is reproducible from its seed, obeys
its time cap, and writes a checkpoint that loads as a stock llava-hf one."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from dpvr.data.digit_scenes import ensure_benchmark
from dpvr.embedded import build_tiny_model
from dpvr.embedded.model import TEXT_LAYERS
from dpvr.embedded.train_tiny import add_arguments, run
from dpvr.errors import DPVRError


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    scenes = {"train": 24, "val": 4, "test": 2, "existence": 16, "all": 16}
    return ensure_benchmark(tmp_path_factory.mktemp("b") / "s", seed=1, scenes=scenes, progress=False)


def _args(out, data, **kw):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--out", str(out), "--data", str(data), "--seed", "1", "--vision-steps", "3", "--existence-steps", "3",
            "--text-steps", "2", "--align-steps", "2", "--tune-steps", "3", "--batch-size", "4",
            "--eval-every", "3", "--eval-n", "6"]  # fmt: skip
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return parser.parse_args(argv)


@pytest.mark.slow  # two short runs: ~30 s on 2 idle cores
def test_train_tiny_is_reproducible_and_loads(bench, tmp_path):
    assert run(_args(tmp_path / "a", bench)) == 0
    assert run(_args(tmp_path / "b", bench)) == 0
    raw_a, raw_b = (tmp_path / d / "model.safetensors" for d in "ab")
    assert raw_a.read_bytes() == raw_b.read_bytes(), "same seed, different model.safetensors"
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a")
    a, init = model.state_dict(), build_tiny_model(seed=1)[0].state_dict()
    assert a.keys() == init.keys()
    for part in ("language_model.layers.0.self_attn.q_proj", "vision_tower.encoder.layers.0.mlp.fc1",
                 "multi_modal_projector.linear_1"):  # fmt: skip
        key = next(k for k in a if part in k)
        assert not torch.equal(a[key], init[key]), f"{key} is unchanged by training"
    processor = AutoProcessor.from_pretrained(tmp_path / "a")
    assert processor.image_token_id == model.config.image_token_index
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert log["steps"] == {"vision": 3, "existence": 3, "text": 2, "align": 2, "tune": 3}
    assert log["val"] and "stopped_early" not in log
    assert model.config.text_config.num_hidden_layers == TEXT_LAYERS  # grown from --shallow-layers
    assert (tmp_path / "a" / "training_curve.png").stat().st_size > 1000


def test_minutes_cap_stops_training_and_says_so(bench, tmp_path):
    run(_args(tmp_path / "c", bench, minutes=0))
    log = json.loads((tmp_path / "c" / "training_log.json").read_text())
    assert log["stopped_early"].startswith("existence stopped at step 0/3"), log.get("stopped_early")


def test_data_dir_must_be_a_benchmark(tmp_path):
    with pytest.raises(DPVRError, match="not a digit-scenes benchmark"):
        run(_args(tmp_path / "d", tmp_path))
