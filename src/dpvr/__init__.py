"""dpvr: dual-path vision-token routing (DPVR), FastV and VTW for HuggingFace vision-language models
(LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL).

    from dpvr import DPVRConfig, convert
    model = convert(stock_model, DPVRConfig(mode="lf", split_layer=18, fusion_layers=1, side_depth=1))

The names below are imported on first use, so `import dpvr` and `dpvr --help` do not pay for torch and
transformers until a model is touched.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dpvr.errors import DPVRError, NonFiniteError
from dpvr.lazy import lazy_names

__version__ = "0.1.0"
_LAZY = {"DPVRConfig": "dpvr.config", "MODES": "dpvr.config", "DPVRForConditionalGeneration": "dpvr.routing",
         "DPVRLlavaConfig": "dpvr.routing", "convert": "dpvr.routing"}  # fmt: skip
__all__ = sorted([*_LAZY, "DPVRError", "NonFiniteError"])
__getattr__, __dir__ = lazy_names(__name__, _LAZY)

if TYPE_CHECKING:  # what the lazy table stands for, for type checkers and IDEs
    from dpvr.config import MODES, DPVRConfig
    from dpvr.routing import DPVRForConditionalGeneration, DPVRLlavaConfig, convert
