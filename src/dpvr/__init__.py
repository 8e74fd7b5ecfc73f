"""dpvr: dual-path vision-token routing (DPVR), FastV and VTW for HuggingFace LLaVA models.

    from dpvr import DPVRConfig, convert
    model = convert(llava_model, DPVRConfig(mode="lf", split_layer=18, fusion_layers=1, side_depth=1))
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
