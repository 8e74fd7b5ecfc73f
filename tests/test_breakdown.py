"""`dpvr breakdown`: stages of a routed prefill timed and FLOP-counted, checked against vanilla's layers."""
from __future__ import annotations

import json

import torch
from tiny import tiny_llava

from dpvr import DPVRConfig, convert
from dpvr.bench import latency as lat
from dpvr.bench.breakdown import measure, stage_table
from dpvr.bench.flops import forward_flops
from dpvr.cli import main as dpvr_main
from dpvr.routing import forward


def test_stages_count_the_flops_of_the_layers_they_run():
    """LF's shared stage does exactly vanilla's work in the same layers; its text-only stage does at most
    the text's share of it; nested stages (the last layer's text queries) count once; hooks come off."""
    model = convert(tiny_llava(attn="sdpa"), DPVRConfig(mode="lf", split_layer=2, fusion_layers=1)).eval()
    L = len(model.model.language_model.layers)
    n_txt = 6
    w = lat.make_workload(model.config, n_txt, 2, "cpu", torch.float32)
    T = w.input_ids.shape[1]
    raw = measure(model, ["vanilla", "lf", "vtw"], w, "cpu", repeats=2)
    assert not forward.STAGE_HOOKS, "breakdown left a stage hook installed"

    lf, van = raw["lf"], raw["vanilla"]
    names = list(lf["flops"])
    assert [n.split(" (")[0] for n in names] == [
        "vision tower", "layers 0-1 on all", "side branch on image", f"layers 2-{L - 2} on text",
        f"layer {L - 1}: text queries, image keys/values",
    ], names  # fmt: skip
    assert list(van["flops"]) == ["vision tower"] + [f"layer {i}" for i in range(L)], list(van["flops"])
    assert lf["flops"][names[0]] == van["flops"]["vision tower"] > 0
    shared = van["flops"]["layer 0"] + van["flops"]["layer 1"]
    assert lf["flops"][names[1]] == shared, f"shared stage {lf['flops'][names[1]]} FLOPs vs vanilla's layers {shared}"
    deep = sum(van["flops"][f"layer {i}"] for i in range(2, L - 1))
    text_only = lf["flops"][names[3]]
    assert 0 < text_only <= deep * n_txt / T, f"text-only stage {text_only} FLOPs vs vanilla's {deep} over {T} tokens"
    for mode in ("vanilla", "lf", "vtw"):
        assert sum(raw[mode]["flops"].values()) <= raw[mode]["flops_total"], mode
        for stages, total in zip(raw[mode]["rounds"], raw[mode]["totals"]):
            assert list(stages) == list(raw[mode]["flops"]), (mode, list(stages))  # same stages every round
            assert 0 < sum(stages.values()) <= total, (mode, stages, total)

    # with sdpa's CPU kernel counted, the totals are the analytic model's (dense attention rectangles)
    for mode in ("vanilla", "lf", "vtw"):
        want = forward_flops(model.config, mode, 2, 1, 1, n_img=model.config.image_seq_length, n_txt=n_txt, batch=2,
                             logits_tokens=lat.PREFILL_LOGITS)["total"]  # fmt: skip
        got = raw[mode]["flops_total"]
        assert abs(got - want) <= 0.02 * want, f"{mode}: counted {got} vs analytic {want} ({got / want - 1:+.2%})"

    t = stage_table(raw, "lf")
    assert t["flop_ratio"] == lf["flops_total"] / van["flops_total"] < 1
    (text_row,) = [s for s in t["stages"] if s["name"] == names[3]]
    assert text_row["vanilla_flops"] == deep and text_row["vanilla_seconds"] > 0
    expected = text_row["seconds"] - text_row["flops"] / t["vanilla_layer_flops_per_s"]
    assert abs(text_row["excess_seconds"] - expected) < 1e-12


def test_breakdown_command_writes_json_plot_and_table(tmp_path, capsys):
    out = tmp_path / "bd"
    rc = dpvr_main(["breakdown", "--preset", "tiny", "--text-len", "8", "--repeats", "1", "--modes", "lf,vtw",
                    "--threads", "1", "--out", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads((out / "breakdown.json").read_text())
    assert set(result["modes"]) == {"lf", "vtw"}
    assert (out / "breakdown.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "lf, stages in run order" in printed and "of its FLOP saving" in printed, printed[-2000:]


def test_breakdown_without_a_routed_mode_is_refused(tmp_path, capsys):
    rc = dpvr_main(["breakdown", "--preset", "tiny", "--modes", "vanilla", "--out", str(tmp_path)])
    assert rc == 1
    assert "names no routed mode" in capsys.readouterr().err
