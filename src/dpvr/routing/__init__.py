"""Routing: the DPVR classes and convert, the backbone seam, the routed decoder loop, token sets and the routed layer.

The names are imported on first use: the schedule and the FLOP model (pure Python) load without torch.
"""
from dpvr.lazy import lazy_names

_LAZY = {name: "dpvr.routing.classes" for name in
         ("DPVR_CLASSES", "DPVRForConditionalGeneration", "DPVRLlavaConfig", "convert")}  # fmt: skip
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_names(__name__, _LAZY)
