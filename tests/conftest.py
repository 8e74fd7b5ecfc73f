"""Shared fixtures: an untrained tiny LLaVA saved like a llava-hf checkpoint (model + processor)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Folder of the untrained embedded architecture (seed 0): loads with from_pretrained / AutoProcessor."""
    from dpvr.embedded import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-checkpoint")
    model, processor = build_tiny_model(seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
