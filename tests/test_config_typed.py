"""One typed routing object: a split left to the model is chosen once (DPVRConfig.resolve_for, when the
config meets a model) and the resolved config is what the model keeps and saves; the routing flags and
a DPVRConfig convert both ways (from_namespace / to_argv); the commands take the object itself."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tiny_llava

from dpvr import DPVRConfig, DPVRError, DPVRForConditionalGeneration, convert
from dpvr.bench.flops import forward_flops
from dpvr.config import MODES, ROUTING_FLAGS, add_routing_arguments, default_split
from dpvr.eval.lmms_plugin import routing_model_args
from dpvr.loading import load_model
from dpvr.model_flags import add_model_arguments

LAYERS = 6


def test_a_split_left_to_the_model_is_chosen_once_and_saved_resolved(tmp_path):
    base = tiny_llava(layers=LAYERS)
    cfg = DPVRConfig(mode="lf", split_layer=None)
    resolved = cfg.resolve_for(base.config)
    assert resolved.split_layer == default_split(LAYERS) and resolved == cfg.resolve_for(base.config)
    assert resolved.resolve_for(base.config) is resolved  # nothing left to derive: the same object
    model = convert(base, cfg)
    assert model.dpvr_config == resolved
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["dpvr"]
    assert saved["split_layer"] == default_split(LAYERS) and DPVRConfig.from_dict(saved) == resolved
    assert DPVRForConditionalGeneration.from_pretrained(tmp_path).dpvr_config == resolved


def test_a_dpvr_models_own_split_is_its_default(tmp_path):
    """Another routing on a saved side branch, split not given: the checkpoint's split, not 18/32 of the depth."""
    model = convert(tiny_llava(layers=LAYERS), DPVRConfig(mode="pc", split_layer=2))
    assert DPVRConfig(mode="kv", split_layer=None).resolve_for(model.config).split_layer == 2
    with model.routing(mode="kv", split_layer=None):
        assert model.dpvr_config == DPVRConfig(mode="kv", split_layer=2)
    model.save_pretrained(tmp_path, side_branch_only=True)
    kv = DPVRForConditionalGeneration.from_pretrained(tmp_path, base_model=tiny_llava(layers=LAYERS),
                                                      dpvr_config=DPVRConfig(mode="kv", split_layer=None))  # fmt: skip
    assert (kv.dpvr_config.mode, kv.dpvr_config.split_layer) == ("kv", 2)


def test_an_unresolved_config_says_how_to_resolve_it():
    with pytest.raises(DPVRError, match=r"split_layer=None is derived from the model: use cfg.resolve_for") as err:
        DPVRConfig(mode="lf", split_layer=None).validate_for(LAYERS)
    assert "\n" not in str(err.value)
    with pytest.raises(DPVRError, match="out of range"):
        DPVRConfig(mode="lf", split_layer=LAYERS).resolve_for(tiny_llava(layers=LAYERS).config)


def test_the_model_keeps_the_typed_object_and_the_dict_only_in_its_json():
    model = convert(tiny_llava(layers=LAYERS), DPVRConfig(mode="lf", split_layer=2, fusion_at=(3, 5)))
    assert isinstance(model.config.dpvr, DPVRConfig) and model.dpvr_config is model.dpvr_config  # not rebuilt
    assert json.loads(model.config.to_json_string())["dpvr"] == json.loads(json.dumps(model.dpvr_config.to_dict()))
    with model.routing(mode="vtw"):
        assert model.dpvr_config.mode == "vtw"
    assert model.dpvr_config.mode == "lf"
    model.config.dpvr = {"mode": "vtw", "split_layer": 3}  # a dict assigned (an older caller) is typed on the way in
    assert model.dpvr_config == DPVRConfig(mode="vtw", split_layer=3)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)  # mode=None and split_layer=None there: the commands' own defaults
    return parser


@st.composite
def routings(draw) -> DPVRConfig:
    mode = draw(st.sampled_from(MODES))
    split = draw(st.one_of(st.none(), st.integers(1, 40)))
    fields = dict(mode=mode, split_layer=split, fusion_layers=draw(st.integers(0, 4)), side_depth=draw(st.integers(1, 3)),
                  fastv_layer=draw(st.integers(0, 8)), fastv_ratio=draw(st.sampled_from((0.0, 0.25, 0.5, 1 / 3, 1.0))),
                  shallow_fastv=draw(st.booleans()))  # fmt: skip
    if mode == "lf":
        fields["fusion_at"] = tuple(draw(st.sets(st.integers(0, 40), max_size=3)))
    return DPVRConfig(**fields)


@settings(max_examples=200, deadline=None)
@given(routings())
def test_flags_and_config_round_trip(cfg):
    assert DPVRConfig.from_namespace(_parser().parse_args(cfg.to_argv())) == cfg
    named = cfg.to_argv(ROUTING_FLAGS)  # every flag said, defaults included
    assert DPVRConfig.from_namespace(_parser().parse_args(named)) == cfg


def test_to_argv_says_the_mode_the_split_and_what_differs():
    assert DPVRConfig(mode="vtw", split_layer=9).to_argv() == ["--mode", "vtw", "--split-layer", "9"]
    assert DPVRConfig(mode="lf", split_layer=None, fusion_at=(3, 5), shallow_fastv=True).to_argv() == [
        "--mode", "lf", "--fusion-layers", "2", "--fusion-at", "3,5", "--shallow-fastv"]  # fmt: skip
    assert DPVRConfig(mode="pc", split_layer=2).to_argv(["shallow_fastv"]) == ["--no-shallow-fastv"]
    bench = argparse.ArgumentParser()
    add_routing_arguments(bench, ("split_layer", "side_depth"), split_layer=None)  # a command with some flags only
    assert DPVRConfig.from_namespace(bench.parse_args(["--side-depth", "2"]), mode="pc") == DPVRConfig(
        mode="pc", split_layer=None, side_depth=2)  # fmt: skip
    with pytest.raises(DPVRError, match="unknown DPVRConfig field"):
        DPVRConfig.from_namespace(argparse.Namespace(), split=3)


def test_load_model_takes_the_object_or_its_fields(tiny_checkpoint):
    cfg = DPVRConfig(mode="vtw", split_layer=None)
    by_object = load_model(model=str(tiny_checkpoint), routing=cfg)[0]
    by_fields = load_model(model=str(tiny_checkpoint), mode="vtw")[0]
    L = by_object.config.text_config.num_hidden_layers
    assert by_object.dpvr_config == by_fields.dpvr_config == DPVRConfig(mode="vtw", split_layer=default_split(L))
    with pytest.raises(TypeError, match="not both"):
        load_model(model=str(tiny_checkpoint), routing=cfg, split_layer=3)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['split'\]"):
        load_model(model=str(tiny_checkpoint), mode="vtw", split=3)


def test_forward_flops_takes_the_object():
    config = convert(tiny_llava(layers=LAYERS), DPVRConfig(mode="lf", split_layer=2)).config
    for cfg in (DPVRConfig(mode="lf", split_layer=2, fusion_at=(3, 5), shallow_fastv=True, fastv_layer=1),
                DPVRConfig(mode="fastv", fastv_layer=1, fastv_ratio=0.75), DPVRConfig(mode="kv", split_layer=3)):
        by_name = forward_flops(config, cfg.mode, cfg.split_layer, cfg.fusion_layers, cfg.side_depth, n_txt=12,
                                fastv_layer=cfg.fastv_layer, fastv_ratio=cfg.fastv_ratio,
                                shallow_fastv=cfg.shallow_fastv, fusion_at=cfg.fusion_at)  # fmt: skip
        assert forward_flops(config, cfg, n_txt=12) == by_name
    # no split given: the model's own (2 here), as convert would resolve it
    assert forward_flops(config, DPVRConfig(mode="lf", split_layer=None)) == forward_flops(config, "lf", 2)
    with pytest.raises(TypeError, match="carries its own fields"):
        forward_flops(config, DPVRConfig(mode="lf", split_layer=2), 3)


def test_lmms_model_args_become_routing_fields():
    args = {"mode": "lf", "split_layer": "6", "fusion_at": "3:5", "shallow_fastv": "False", "fastv_ratio": "0.25",
            "batch_size": 4}  # fmt: skip
    routing = routing_model_args(args)
    assert routing == {"mode": "lf", "split_layer": 6, "fusion_at": (3, 5), "shallow_fastv": False, "fastv_ratio": 0.25}
    assert args == {"batch_size": 4}  # the rest is lmms-eval's
    assert routing_model_args({"mode": "None", "split_layer": None}) == {"mode": None, "split_layer": None}


@torch.no_grad()
def test_train_resolves_the_split_it_was_not_given():
    from dpvr.train.args import ModelArguments
    from dpvr.train.trainer import build_model

    model, _ = build_model(ModelArguments(mode="lf"))
    L = model.config.text_config.num_hidden_layers
    assert model.dpvr_config.split_layer == default_split(L)
