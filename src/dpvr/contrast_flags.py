"""The command-line flags of contrastive attention (`dpvr eval`, `dpvr generate`), free of torch so that
`--help` answers at once; the mechanism itself is `dpvr.contrast` (docs/contrastive.md)."""
from __future__ import annotations

import argparse

from dpvr.cli_types import at_least, int_list
from dpvr.errors import UsageError


def add_contrast_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("contrastive attention (training-free; docs/contrastive.md)")
    g.add_argument("--contrast-strength", type=float, default=None,
                   help="turn it on with this strength (0: it runs and changes nothing); off when not given")
    g.add_argument("--contrast-early", type=at_least(0), default=None,
                   help="the early-fusion layer whose attention is the reference (dpvr analyze's masking curve)")
    g.add_argument("--contrast-layers", type=int_list(0), default=None,
                   help="comma-separated layers to re-weight (default: the last quarter of the layers)")  # fmt: skip


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The final layers, the related paper's side of the contrast: the last quarter (at least one)."""
    return tuple(range(num_layers - max(1, num_layers // 4), num_layers))


def contrast_config(args: argparse.Namespace, num_layers: int):
    """The ContrastConfig the flags ask for, or None when --contrast-strength is not given."""
    if args.contrast_strength is None:
        if args.contrast_early is not None or args.contrast_layers is not None:
            raise UsageError("--contrast-early/--contrast-layers need --contrast-strength (contrast is off without it)")
        return None
    if args.contrast_early is None:
        raise UsageError("--contrast-strength needs --contrast-early, the early-fusion layer (see `dpvr analyze`)")
    from dpvr.contrast import ContrastConfig

    layers = tuple(args.contrast_layers) if args.contrast_layers else default_layers(num_layers)
    cfg = ContrastConfig(args.contrast_early, layers, args.contrast_strength)
    cfg.validate_for(num_layers)
    return cfg
