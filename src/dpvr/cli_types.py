"""argparse value types shared by the commands: counts checked where they are parsed, so `--batch-size 0`
is a one-line usage error (exit 2) instead of a crash (or a silent empty result) deep inside a run.

    p.add_argument("--batch-size", type=at_least(1), default=32)
    p.add_argument("--text-lens", type=int_list(1), default="32,64")   # -> [32, 64]
"""
from __future__ import annotations

import argparse


def at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _number(text: str, low: float, inclusive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= low if inclusive else value > low):
        raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low:g}, got {text}")
    return value


def positive_float(text: str) -> float:
    return _number(text, 0, inclusive=False)


def non_negative_float(text: str) -> float:
    return _number(text, 0, inclusive=True)


positive_float.__name__ = "number > 0"
non_negative_float.__name__ = "number >= 0"


def int_list(low: int = 1):
    """A comma-separated list of integers, each >= low, at least one of them."""
    one = at_least(low)

    def parse(text: str) -> list[int]:
        values = [one(x.strip()) for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError("needs at least one integer")
        return values

    parse.__name__ = f"comma-separated integers >= {low}"
    return parse


class OneDefaultFormatter(argparse.HelpFormatter):
    """Each option's default said once: appended as "(default: X)" unless its help already says one, and left
    out where there is nothing to say (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        empty = default is None or default is False or (isinstance(default, (list, tuple, str)) and not default)
        if "default" in text.lower() or action.required or empty or default is argparse.SUPPRESS:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})".strip()


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make parser (and its argument errors) print one line naming the problem and exit 2, instead of
    the usage block, which for `dpvr train` (every TrainingArguments flag) hides the error."""

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error
    return parser
