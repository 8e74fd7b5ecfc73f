"""`dpvr generate` end to end on an untrained tiny LLaVA saved like a llava-hf checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dpvr.cli import main


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("generate")
    for f in tiny_checkpoint.iterdir():
        (d / f.name).symlink_to(f)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / "img.png")
    return d


def test_generate_compare_prints_both_answers(checkpoint, capsys):
    rc = main(["generate", "--model", str(checkpoint), "--image", str(checkpoint / "img.png"), "--prompt",
               "which digit is in the top left cell ?", "--mode", "lf", "--split-layer", "6", "--compare",
               "--max-new-tokens", "3"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "lf s=6 K=1 D=1" in out and "vanilla" in out and "TTFT ms" in out


def test_generate_errors_are_one_line(checkpoint, capsys):
    rc = main(["generate", "--model", str(checkpoint), "--image", str(checkpoint / "missing.png"), "--prompt", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "missing.png" in err[0], err
