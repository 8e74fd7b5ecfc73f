"""The README a stranger follows: every file or folder it names exists, every table has as many cells
per row as its header, and every flag it gives a command is one that command accepts."""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from dpvr.cli import COMMANDS, command_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PATH_PREFIXES = ("docs/", "src/", "scripts/", "tests/", "benchmarks/", ".ci/", "run.py", "pyproject.toml")


def _named_paths() -> set[str]:
    links = re.findall(r"\]\(([^)#\s]+)", README)  # markdown links and images
    code = re.findall(r"`([^`\s]+)`", README)  # inline code naming a repository path
    return {p.rstrip(".,:;") for p in [*links, *code] if p.startswith(PATH_PREFIXES)}


def test_readme_names_only_files_that_exist():
    names = _named_paths()
    assert len(names) >= 10, f"found only {sorted(names)}: the pattern no longer sees the README's paths"
    missing = sorted(p for p in names if not (ROOT / p).exists())
    assert not missing, missing


def test_readme_tables_have_as_many_cells_as_headers():
    rows = [line for line in README.splitlines() if line.startswith("|")]
    assert rows
    for block in re.findall(r"((?:^\|.*\n)+)", README, re.M):
        lines = block.strip().splitlines()
        width = len(lines[0].strip("|").split("|"))
        bad = [line for line in lines if len(line.strip("|").split("|")) != width]
        assert not bad, f"rows whose cell count differs from the header's {width}: {bad}"


def _commands() -> list[tuple[str, list[str]]]:
    """(command, its flags) for every `dpvr CMD ...` / `python3 run.py CMD ...` in the README."""
    blocks = re.findall(r"^```\w*\n(.*?)^```", README, re.M | re.S)
    code_lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```.*?^```", "", README, flags=re.M | re.S)
    found = []
    for line in [*code_lines, *re.findall(r"`([^`]+)`", prose)]:
        line = line.split("#")[0]
        m = re.match(r"\s*(?:python3 run\.py (?:dpvr )?|dpvr )([a-z][\w-]*)(.*)", line)
        if m and m.group(1) not in ("test", "dpvr"):
            flags = [t.split("=")[0] for t in shlex.split(m.group(2)) if t.startswith("--")]
            found.append((m.group(1), flags))
    return found


def _accepted(name: str) -> set[str]:
    if name == "train":
        from transformers import TrainingArguments

        from dpvr.train.args import DataArguments, ModelArguments, RecipeArguments

        fields = [f.name for cls in (ModelArguments, DataArguments, TrainingArguments, RecipeArguments)
                  for f in dataclasses.fields(cls)]  # fmt: skip
        return {f"--{n}" for n in fields} | {f"--{n.replace('_', '-')}" for n in fields} | {"--help", "--help-trainer"}
    return set(command_parser(name)._option_string_actions)


def test_readme_commands_and_flags_exist():
    commands = _commands()
    assert {"demo", "generate", "data"} <= {name for name, _ in commands}, commands
    for name, flags in commands:
        assert name in COMMANDS, f"the README runs `dpvr {name}`, which is not a command"
        unknown = sorted(set(flags) - _accepted(name))
        assert not unknown, f"dpvr {name} does not accept {unknown}"


@pytest.mark.parametrize("flag", sorted(set(re.findall(r"`(--[a-z][\w-]*)", README))))
def test_every_flag_the_readme_names_is_accepted_somewhere(flag):
    assert any(flag in _accepted(name) for name in COMMANDS), f"no command accepts {flag}"
