"""dpvr's vLLM plugin without vLLM: which routings it serves, the stages it runs them as (checked against
dpvr's own schedule), and that `import dpvr` leaves vLLM alone. tests/test_vllm.py runs the engine."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dpvr.config import DPVRConfig
from dpvr.errors import DPVRError
from dpvr.routing.schedule import compile_schedule, layer_contents
from dpvr.serve.vllm.plan import serving_plan

L = 16
ROUTINGS = [
    DPVRConfig(mode="lf", split_layer=9, fusion_layers=1),
    DPVRConfig(mode="lf", split_layer=9, fusion_layers=3),
    DPVRConfig(mode="lf", split_layer=9, fusion_at=(9, 12, 13)),
    DPVRConfig(mode="lf", split_layer=5, fusion_at=(7, 15)),
    DPVRConfig(mode="lf", split_layer=9, fusion_layers=0),
    DPVRConfig(mode="vtw", split_layer=9),
    DPVRConfig(mode="vanilla"),
]


@pytest.mark.parametrize("cfg", ROUTINGS, ids=lambda c: f"{c.mode}-K{c.fusion_layers}-{c.fusion_at}")
def test_stages_cover_the_schedule(cfg):
    """Every layer runs once, in order; text-only stages are exactly the layers whose keys/values the
    schedule keeps for text alone; the side branch runs once, before the first reset of the image rows."""
    plan = serving_plan(cfg, L)
    assert [i for s in plan.stages for i in s.layers] == list(range(L))
    contents = layer_contents(compile_schedule(cfg, L), L)
    assert [i for s in plan.stages if s.text_only for i in s.layers] == [i for i, (keys, _) in enumerate(contents) if keys == "text"]
    sides = [k for k, s in enumerate(plan.stages) if s.side_before]
    resets = [k for k, s in enumerate(plan.stages) if s.images_from_side]
    assert len(sides) == (1 if resets else 0) and (not resets or sides[0] <= resets[0])
    assert plan.routes == (cfg.mode != "vanilla")


def test_lf_ideal_runs_as_vtw():
    lf_ideal = serving_plan(DPVRConfig(mode="lf", split_layer=9, fusion_layers=0), L)
    assert lf_ideal == serving_plan(DPVRConfig(mode="vtw", split_layer=9), L)


@pytest.mark.parametrize("cfg", [DPVRConfig(mode="pc", split_layer=9), DPVRConfig(mode="kv", split_layer=9),
                                 DPVRConfig(mode="fastv"), DPVRConfig(mode="lf", split_layer=9, shallow_fastv=True)])  # fmt: skip
def test_unservable_routings_are_refused(cfg):
    with pytest.raises(DPVRError, match="vLLM plugin") as err:
        serving_plan(cfg, L)
    assert "\n" not in str(err.value)


def test_import_dpvr_leaves_vllm_alone():
    code = ("import sys, dpvr, dpvr.routing, dpvr.serve, dpvr.serve.vllm, dpvr.serve.vllm.plan; "
            "assert 'vllm' not in sys.modules, 'vllm was imported'")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plugin_entry_point_is_declared():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"dpvr": "dpvr.serve.vllm:register"}
    assert "vllm" in project["optional-dependencies"]
