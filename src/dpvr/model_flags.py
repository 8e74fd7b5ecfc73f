"""The model flags every model-loading command shares (--model, --adapter, the routing flags, --attn,
--dtype, --device), kept free of torch and transformers so that `dpvr COMMAND --help` answers at once.

    parser = argparse.ArgumentParser(); add_model_arguments(parser)
    model, processor = dpvr.loading.load_model(**model_kwargs(parser.parse_args()))
"""
from __future__ import annotations

import argparse

from dpvr.config import ROUTING_FLAGS, add_routing_arguments


def add_model_arguments(parser: argparse.ArgumentParser, with_mode: bool = True) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="checkpoint dir or hub id (default: the embedded tiny LLaVA)")
    g.add_argument("--adapter", default=None, help="DPVR side-branch (or PEFT LoRA) checkpoint to load onto --model")
    if with_mode:
        add_routing_arguments(g, mode=None, split_layer=None)
        g.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                       help="the routing `dpvr analyze` recommends in DIR (a `dpvr demo` or analyze output folder), "
                            "with the side branch trained for it there if any (dpvr.recommended)")  # fmt: skip
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights' dtype")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when one is available)")


def resolve_device(device: str) -> str:
    """'auto' as the device to use (cuda when one is available); any other name as it is."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_kwargs(args: argparse.Namespace) -> dict:
    """load_model's keyword arguments from the command line; with `--from DIR`, the routing DIR's analysis
    recommends (printed in a line)."""
    keys = ["model", "adapter", *ROUTING_FLAGS, "attn", "dtype", "device"]
    kwargs = {k: getattr(args, k) for k in keys if hasattr(args, k)}  # load_model resolves --device auto
    if getattr(args, "from_dir", None) is None:
        return kwargs
    from dpvr.recommended import from_folder

    kwargs, line = from_folder(args.from_dir, kwargs)
    print(line, flush=True)
    return kwargs
