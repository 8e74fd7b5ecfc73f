"""The `dpvr` command line: one sub-command per concern, each living next to the code it drives.

    dpvr --help                 # every command, one line each
    dpvr COMMAND --help         # its options and defaults
    dpvr COMMAND ... --debug    # full traceback instead of the one-line error

Exit codes: 0 done, 1 an error (one line on stderr naming it), 2 a usage error (a bad option value or
combination, also one line), 130 interrupted (Ctrl-C). tests/test_bad_input.py holds every command to it.

Each command module exposes `add_arguments(parser)` and `run(args) -> int | None`, or, when it owns
its parsing (`dpvr train` takes every HF TrainingArguments flag), `main(argv) -> int | None`.
Modules are imported only when their command runs, so `dpvr --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from dpvr.cli_types import OneDefaultFormatter, one_line_errors
from dpvr.errors import DPVRWarning, UsageError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dpvr.demo", "Run the whole pipeline on the embedded default and write an HTML report."),
    "generate": ("dpvr.generate", "Answer a question about an image, streaming tokens (routed KV cache)."),
    "analyze": ("dpvr.analysis.cli", "Three-view saturation + layer-wise masking analysis; recommends a split."),
    "train": ("dpvr.train.cli", "Train the side branch (or a baseline) on LLaVA-665k-format data."),
    "reproduce": ("dpvr.demo.reproduce", "Re-run the paper's tables and sweeps on the embedded default."),
    "serve": ("dpvr.serve.cli", "Serve a routed model behind an OpenAI-compatible chat API (transformers serve)."),
    "eval": ("dpvr.eval.cli", "Score a model on the digit-scenes benchmark with the paper's metrics."),
    "bench": ("dpvr.bench.cli", "Measure prefill/decode latency, memory and KV bytes for every mode."),
    "breakdown": ("dpvr.bench.breakdown", "Time and count FLOPs per stage of a routed prefill, against vanilla."),
    "flops": ("dpvr.bench.flops", "Print the analytic forward-FLOPs table for an architecture."),
    "data": ("dpvr.data.cli", "Write the digit-scenes benchmark (LLaVA-665k JSON + PNG images)."),
    "train-tiny": ("dpvr.embedded.train_tiny", "Train the embedded tiny LLaVA from scratch (reproducible)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpvr", description="Dual-path vision-token routing for HF LLaVA models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in {"-h", "--help"}:
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        print(f"dpvr: unknown command {argv[0]!r}; one of {', '.join(COMMANDS)} (see dpvr --help)", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    _one_line_warnings(name)
    module = importlib.import_module(COMMANDS[name][0])
    if hasattr(module, "main"):
        return _guarded(name, lambda: module.main(rest), debug="--debug" in rest)
    sub = command_parser(name, module)
    try:
        args = sub.parse_args(rest)
    except SystemExit as exc:  # --help (0) or a usage error (2, its line already printed): a code, as documented
        return int(exc.code or 0)
    return _guarded(name, lambda: module.run(args), debug=args.debug)


def command_parser(name: str, module=None) -> argparse.ArgumentParser:
    """The argument parser of command `name` (one that declares `add_arguments`)."""
    module = module or importlib.import_module(COMMANDS[name][0])
    sub = one_line_errors(argparse.ArgumentParser(
        prog=f"dpvr {name}", description=COMMANDS[name][1], formatter_class=OneDefaultFormatter
    ))
    module.add_arguments(sub)
    sub.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return sub


def _one_line_warnings(name: str) -> None:
    """dpvr's own warnings as `dpvr NAME: warning: ...`, without the source line Python would print.
    Installed once per process; later commands (tests call main() many times) only rename it."""
    global _COMMAND
    _COMMAND = name
    if getattr(warnings.showwarning, "_dpvr", False):
        return
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DPVRWarning):
            print(f"dpvr {_COMMAND}: warning: {message}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    show._dpvr = True
    warnings.showwarning = show


_COMMAND = "dpvr"


def _guarded(name: str, call, debug: bool) -> int:
    try:
        return int(call() or 0)
    except SystemExit as exc:  # a command that owns its parsing (dpvr train) met a usage error or --help
        return int(exc.code or 0) if isinstance(exc.code, (int, type(None))) else 1
    except KeyboardInterrupt:
        print(f"dpvr {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line unless --debug
        if debug:
            raise
        print(f"dpvr {name}: error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
