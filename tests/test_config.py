"""DPVRConfig is frozen and normalised (compared as objects, however it was written); routing flags come
from its fields; the library imports neither the app layer nor itself in a cycle."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tiny import IMAGE_TOKEN, PAD, pixels, prompt, tiny_llava

from dpvr import DPVRConfig, DPVRError, DPVRForConditionalGeneration, convert
from dpvr.config import ROUTING_FLAGS
from dpvr.loading import add_model_arguments, model_kwargs

SRC = Path(__file__).resolve().parents[1] / "src" / "dpvr"


def test_config_is_frozen_normalised_and_hashable():
    cfg = DPVRConfig(mode="lf", split_layer=2, fusion_at=[4, 3], fastv_ratio=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.split_layer = 3
    assert cfg.fusion_at == (3, 4) and isinstance(cfg.fastv_ratio, float)
    via_json = DPVRConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # lists where cfg has tuples
    assert via_json == cfg and hash(via_json) == hash(cfg)
    assert dataclasses.replace(cfg, fusion_at=(3,)).fusion_layers == 1
    with pytest.raises(DPVRError, match="shallow_fastv='yes' must be True or False"):
        DPVRConfig(shallow_fastv="yes")
    with pytest.raises(DPVRError, match="fastv_ratio='0.5' must be a number"):
        DPVRConfig(fastv_ratio="0.5")


@torch.no_grad()
def test_a_config_that_went_through_json_keeps_its_cache_and_its_resume(tmp_path):
    """A saved sparse-fusion model reloads with JSON lists in config.dpvr: its generate() cache and a
    training resume from its adapter must not refuse it as another routing."""
    from dpvr.train.trainer import DPVRTrainer

    model = convert(tiny_llava(), DPVRConfig(mode="lf", split_layer=2, fusion_at=(3, 5)))
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "adapter", side_branch_only=True)
    loaded = DPVRForConditionalGeneration.from_pretrained(tmp_path / "full")
    assert loaded.dpvr_config == model.dpvr_config
    loaded.generation_config.pad_token_id, loaded.generation_config.suppress_tokens = PAD, [IMAGE_TOKEN]
    inputs = dict(input_ids=torch.tensor([prompt(3, 4)]), pixel_values=pixels(1), max_new_tokens=4, do_sample=False)
    assert torch.equal(loaded.generate(**inputs, use_cache=True), loaded.generate(**inputs, use_cache=False))
    DPVRTrainer._load_from_checkpoint(None, str(tmp_path / "adapter"), model=loaded)  # same routing: loads
    with loaded.routing(fusion_at=(4,)), pytest.raises(DPVRError, match=r"routing config changed \{'fusion_layers'"):
        DPVRTrainer._load_from_checkpoint(None, str(tmp_path / "adapter"), model=loaded)


def test_routing_flags_come_from_the_config_fields():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args([])
    defaults = DPVRConfig()
    for name in ROUTING_FLAGS:
        if name not in ("mode", "split_layer"):  # derived per command: no routing, 18/32 of the depth
            assert getattr(args, name) == getattr(defaults, name), name
    kw = model_kwargs(parser.parse_args(["--mode", "lf", "--fusion-at", "3,5", "--shallow-fastv", "--fastv-ratio", "0.25"]))
    assert (kw["mode"], kw["fusion_at"], kw["shallow_fastv"], kw["fastv_ratio"]) == ("lf", (3, 5), True, 0.25)
    with pytest.raises(SystemExit):
        parser.parse_args(["--fusion-at", "3,x"])


def _imports(path: Path) -> set[str]:
    """Every dpvr module `path` imports, at top level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpvr"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dpvr")}
    return found


def _library() -> dict[str, set[str]]:
    modules = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if name == "dpvr.cli" or name.startswith("dpvr.demo"):
            continue  # the app layer
        modules[name] = _imports(path)
    return {m: {i for i in deps if i in modules or i in ("dpvr.cli",) or i.startswith("dpvr.demo")}
            for m, deps in modules.items()}  # fmt: skip


def test_library_never_imports_the_app_layer():
    bad = {m: sorted(d for d in deps if d == "dpvr.cli" or d.startswith("dpvr.demo")) for m, deps in _library().items()}
    assert not {m: d for m, d in bad.items() if d}


def test_routing_has_no_import_cycle():
    graph = {m: {d for d in deps if d.startswith("dpvr.routing.") and d != m}
             for m, deps in _library().items() if m.startswith("dpvr.routing.")}  # fmt: skip
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in graph.get(m, ()):
            visit(d, path + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])
