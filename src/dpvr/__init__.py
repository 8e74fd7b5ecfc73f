"""dpvr: dual-path vision-token routing (DPVR), FastV and VTW for HuggingFace vision-language models
(LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL).

    from dpvr import DPVRConfig, convert
    model = convert(stock_model, DPVRConfig(mode="lf", split_layer=18, fusion_layers=1, side_depth=1))
"""
from dpvr.config import MODES, DPVRConfig
from dpvr.errors import DPVRError, NonFiniteError
from dpvr.routing import DPVRForConditionalGeneration, DPVRLlavaConfig, convert

__version__ = "0.1.0"
__all__ = [
    "DPVRConfig",
    "DPVRError",
    "DPVRForConditionalGeneration",
    "DPVRLlavaConfig",
    "MODES",
    "NonFiniteError",
    "convert",
]
