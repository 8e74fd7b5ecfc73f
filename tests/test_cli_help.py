"""The command line answers at once and says each thing once: `dpvr --help` and every `dpvr COMMAND
--help` import no torch, transformers or plotting (what made them take tens of seconds), `import dpvr`
imports nothing heavy, each option's default is printed once, dpvr train takes the routing flags in
the spelling the other commands use, and a routed mode with an untrained side branch says so.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import pytest

from dpvr.cli import COMMANDS, main

HEAVY = ("torch", "transformers", "matplotlib", "datasets", "sklearn", "PIL")


def _imported_after(code: str) -> list[str]:
    """The HEAVY modules a fresh interpreter holds after running code."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_every_help_imports_nothing_heavy():
    calls = "; ".join(f"main([{name!r}, '--help'])" for name in COMMANDS)
    code = f"import contextlib, io\nfrom dpvr.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n    main(['--help']); {calls}"
    assert _imported_after(code) == []


def test_import_dpvr_is_light_and_its_names_still_resolve():
    assert _imported_after("import dpvr, dpvr.config, dpvr.analysis, dpvr.eval, dpvr.routing") == []
    loaded = _imported_after("import dpvr; dpvr.convert, dpvr.DPVRForConditionalGeneration, dpvr.DPVRConfig")
    assert "torch" in loaded and "matplotlib" not in loaded and "datasets" not in loaded
    code = "import sys, dpvr; dpvr.convert; print(json.dumps(['transformers.trainer' in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [False], "converting a model must not import the Trainer"


def test_unknown_attribute_is_an_attribute_error():
    import dpvr

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dpvr.nope  # noqa: B018


def _option_blocks(text: str) -> list[str]:
    """Each option's entry in a help text: its flag line and the indented lines under it."""
    blocks: list[str] = []
    for line in text.splitlines():
        if re.match(r"^  -", line):
            blocks.append(line)
        elif blocks and line.startswith("      "):
            blocks[-1] += " " + line.strip()
        elif not line.strip():
            blocks.append("")
    return [b for b in blocks if b]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_says_each_default_once(name, capsys):
    assert main([name, "--help"]) == 0
    blocks = _option_blocks(capsys.readouterr().out)
    assert blocks, "no options found in the help"
    twice = [b for b in blocks if b.lower().count("default") > 1]
    assert not twice, twice


def test_train_help_lists_dpvr_flags_first_and_points_to_the_trainer(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--split-layer" in text and "--fusion-at" in text and "--help-trainer" in text
    assert "--per_device_eval_batch_size" not in text  # the Trainer's own flags live behind --help-trainer
    assert len(text.splitlines()) < 120


def test_train_takes_the_routing_flags_as_other_commands_spell_them():
    from dpvr.train.cli import parse

    for argv in (["--fusion-at", "11,13"], ["--fusion-at=11,13"], ["--fusion_at", "11", "13"]):
        margs, *_ = parse(["--split-layer", "10", *argv, "--output_dir", "unused"])
        assert (margs.split_layer, list(margs.fusion_at)) == (10, [11, 13]), argv


def test_untrained_side_branch_warns_once_and_an_adapter_does_not(tiny_checkpoint, tmp_path):
    from dpvr.errors import DPVRWarning
    from dpvr.loading import load_model

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model, _ = load_model(model=str(tiny_checkpoint), mode="lf", split_layer=6)
        load_model(model=str(tiny_checkpoint), mode="vtw", split_layer=6)  # nothing to train: no warning
        load_model(model=str(tiny_checkpoint), mode="lf", split_layer=6, fusion_layers=0)  # LF-ideal: none either
    mine = [w for w in seen if issubclass(w.category, DPVRWarning)]
    assert len(mine) == 1 and "untrained side branch" in str(mine[0].message)
    model.save_pretrained(tmp_path / "adapter", side_branch_only=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_model(model=str(tiny_checkpoint), adapter=str(tmp_path / "adapter"))
    assert not [w for w in seen if issubclass(w.category, DPVRWarning)]


def test_cli_prints_the_warning_as_one_line(tiny_checkpoint, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    rc = main(["generate", "--model", str(tiny_checkpoint), "--mode", "lf", "--split-layer", "6", "--image",
               str(tmp_path / "img.png"), "--prompt", "which digit?", "--max-new-tokens", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0
    lines = [line for line in err.splitlines() if "untrained side branch" in line]
    assert len(lines) == 1 and lines[0].startswith("dpvr generate: warning: --mode lf"), err


def test_no_library_module_switches_the_plotting_backend():
    """Plots go through matplotlib's Figure: importing dpvr must not change a user's backend or pyplot state."""
    from pathlib import Path

    import dpvr

    src = Path(dpvr.__file__).parent
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py")
                 if "matplotlib.use(" in p.read_text() or "import matplotlib.pyplot" in p.read_text()]  # fmt: skip
    assert not offenders, offenders
