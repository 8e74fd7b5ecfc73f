"""Smoke tests of the measurement scripts in benchmarks/ (the docs cite their figures): each one's --help,
and a real run of its main() at the tiniest setting, on a small digit-scenes benchmark. What they measure
(seconds, padding, losses) is not checked here, only that they run and write what they say they do."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))  # _common: their shared options
SMALL = {"train": 4, "val": 2, "test": 2, "existence": 2, "all": 2}


@pytest.fixture
def load(monkeypatch):
    """Import benchmarks/<name>.py as `python3 benchmarks/<name>.py` would: its folder first on sys.path."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


@pytest.fixture
def bench(digit_bench):
    return digit_bench(3, **SMALL)


def test_every_script_has_a_smoke_test():
    tested = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert SCRIPTS and set(SCRIPTS) <= tested, sorted(set(SCRIPTS) - tested)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, load, capsys):
    with pytest.raises(SystemExit) as exit_:
        load(name).main(["--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_scripts_run_from_the_command_line():
    """The scripts that import a sibling (textworld, train_text, cpu_step_speed) find it when run as files."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    names = ["train_vision", "step_profile"]  # train_vision imports train_text, which imports textworld
    procs = [subprocess.Popen([sys.executable, str(BENCHMARKS / f"{n}.py"), "--help"], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for n in names]  # fmt: skip
    for name, proc in zip(names, procs):
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0 and "usage:" in out, (name, out[-2000:])


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_cpu_step_speed(load, bench, tmp_path, capsys):
    load("cpu_step_speed").main(["--threads", "1", "--rounds", "1", "--steps", "1", "--samples", "8", "--batch", "2",
                                 "--data", str(bench), "--out", str(tmp_path / "o.json")])  # fmt: skip
    printed = _json_out(capsys)
    assert set(printed["seconds_per_step"]) == {f"{a} {k}" for a in ("sdpa", "dpvr_sdpa_fp32") for k in ("random", "grouped")}
    assert json.loads((tmp_path / "o.json").read_text())["seconds_per_step"] == printed["seconds_per_step"]


def test_step_profile(load, bench, capsys):
    load("step_profile").main(["--threads", "1", "--steps", "1", "--samples", "8", "--batch", "2", "--methods", "lora16",
                               "--data", str(bench)])  # fmt: skip
    assert set(_json_out(capsys)["seconds_per_step"]) == {"lora16"}


def test_encoded_memo(load, bench, capsys):
    load("encoded_memo").main(["--samples", "3", "--data", str(bench)])
    out = _json_out(capsys)
    assert out["samples"] == 3 and out["kept_mib"] > 0


def test_padding(load, bench, capsys):
    load("padding").main(["--samples", "3", "--data", str(bench)])
    out = _json_out(capsys)
    assert out["samples"] == 3
    for order in ("random", "grouped"):  # padded work is never less than the samples' own
        assert out[order]["linear"] >= 1 and out[order]["attention"] >= 1


def test_side_branch_effect(load, bench, tmp_path):
    out = tmp_path / "effect.json"
    load("side_branch_effect").main(["--split", "11", "--limit", "2", "--data", str(bench / "val.json"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["samples"] == 2 and {"vanilla", "vtw", "lf K=1 copy", "lf K=4 no-op", "lf K=4 random"} <= set(result)


def test_summarize(load, capsys):
    load("summarize").main(["g2_L4_popeonly_b32_s1"])  # the docs' seed-1 POPE-only run, from docs/evidence/
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| g2_L4_popeonly_b32_s1 ")]
    assert len(rows) == 1 and rows[0].split("|")[4].strip() == "0.98", rows  # POPE 0.98 at step 460, as docs/embedded.md says


def test_textworld(load, capsys):
    load("textworld").main(["--grid", "3", "--turns", "2"])
    scene, *answers = capsys.readouterr().out.splitlines()
    assert scene.startswith("<s> top left ") and len(answers) == 2


def test_train_text(load, tmp_path):
    _train_text(load, tmp_path)


def test_train_vision(load, tmp_path):
    lm = _train_text(load, tmp_path)
    load("train_vision").main(["--name", "v", "--lm", str(lm), "--patch", "8", "--vision-steps", "1", "--align-steps", "1",
                               "--tune-steps", "1", "--batch", "2", "--turns", "2", "--eval-n", "4", "--eval-every", "1",
                               "--log-dir", str(tmp_path)])  # fmt: skip
    recs = [json.loads(x) for x in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r.get("stage") for r in recs[1:] if "step" in r] == ["vision", "vision", "align", "align", "tune", "tune"]
    assert [r["stage"] for r in recs if "attention_on_image" in r] == ["align", "tune"]


def _train_text(load, tmp_path) -> Path:
    """Two steps of the text stage at width 16; returns its saved checkpoint (patch2 form, as train_vision wants)."""
    ckpt = tmp_path / "lm.pt"
    load("train_text").main(["--name", "t", "--grid", "2", "--layers", "1", "--hidden", "16", "--heads", "2", "--steps", "2",
                             "--batch", "2", "--turns", "2", "--eval-every", "1", "--eval-n", "4", "--form", "patch2",
                             "--save", str(ckpt), "--log-dir", str(tmp_path)])  # fmt: skip
    recs = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert recs[0]["args"]["name"] == "t" and [r["step"] for r in recs if "step" in r] == [0, 1, 2]
    assert len(recs[-1]["attention_on_scene"]) == 1 and ckpt.exists()
    return ckpt


def test_fusion_policy(load, bench, tmp_path):
    """One seed, the policy's default placement only, one training step each, from a given analysis."""
    flat = [0.0] * 16
    curves = {"all": flat[:13] + [0.3, 0, 0.2], "count": flat[:12] + [0.4, 0, 0, 0]}
    review = {f: {"cost": c, "cost_sem": [0.01] * 16} for f, c in curves.items()}
    (tmp_path / "analysis.json").write_text(json.dumps({"recommendation": {"split": 11},
                                                        "attention_truth": {"late_review": review}}))  # fmt: skip
    out = tmp_path / "fusion_policy.json"
    load("fusion_policy").main(["--samples", "4", "--singles", "default", "--analysis", str(tmp_path / "analysis.json"),
                                "--data", str(bench), "--work", str(tmp_path / "work"), "--out", str(out)])  # fmt: skip
    record = json.loads(out.read_text())
    assert record["policy"] == {"default": [13, 15], "rules": [{"fusion_at": [12], "task": "count"}]}
    runs = record["runs"]["0"]
    assert set(runs["single"]) == {"[13, 15]"} and set(runs["policy_model_at"]) == {"[13, 15]", "[12]"}
    assert 0 <= runs["policy"] <= 1 and record["prefill_flops"]["[12]"] < record["prefill_flops"]["[13, 15]"]
