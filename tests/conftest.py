"""Shared fixtures: an untrained tiny LLaVA saved like a llava-hf checkpoint (model + processor), and small
digit-scenes benchmarks built once per session."""
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


@pytest.fixture(scope="session")
def digit_bench(tmp_path_factory):
    """`digit_bench(seed, train=4, val=2, ...)`: the folder of a small digit-scenes benchmark of that seed and
    size (`ensure_benchmark`'s `scenes`), built once per session and shared by every test that asks for the
    same one. Tests read it only; a test that writes into a benchmark builds its own."""
    from dpvr.data.digit_scenes import ensure_benchmark

    built = {}

    def get(seed: int = 3, **scenes: int):
        key = (seed, tuple(sorted(scenes.items())))
        if key not in built:
            name = f"bench-s{seed}-" + "-".join(f"{k}{v}" for k, v in key[1])
            built[key] = ensure_benchmark(tmp_path_factory.mktemp(name) / "bench", seed=seed, scenes=scenes, progress=False)
        return built[key]

    return get
