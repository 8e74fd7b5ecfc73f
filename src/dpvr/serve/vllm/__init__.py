"""dpvr inside vLLM (CPU backend): `vllm.LLM(model=<a DPVR checkpoint>)` runs its routing.

Loaded by vLLM through the `vllm.general_plugins` entry point (`pip install dpvr[vllm]`), in every
vLLM process: `register()` makes the DPVR configs known to transformers' AutoConfig, registers the
routed model class for the `DPVRLlavaForConditionalGeneration` architecture a DPVR checkpoint's
config names, and its start-up checks (`dpvr.serve.vllm.checks`). Nothing is imported from vLLM
until vLLM calls it.

    from vllm import LLM
    llm = LLM(model="runs/lf/final", enable_prefix_caching=False, enable_chunked_prefill=False)

Modes served: vanilla, lf (any K, `fusion_at`, K = 0 = LF-ideal) and vtw, for LLaVA-1.5 checkpoints
with a llama text model; the checkpoint folder also needs the processor files (or pass tokenizer=).
"""
from __future__ import annotations

ARCHITECTURE = "DPVRLlavaForConditionalGeneration"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from dpvr.routing.classes import DPVRLlavaConfig  # importable by name: vLLM pickles it to its engine processes
    from dpvr.serve.vllm.checks import EngineChecks

    AutoConfig.register(DPVRLlavaConfig.model_type, DPVRLlavaConfig, exist_ok=True)  # (dpvr.routing.classes did too)
    # by name: vLLM imports the model module only where it builds the model
    ModelRegistry.register_model(ARCHITECTURE, "dpvr.serve.vllm.model:DPVRLlavaForConditionalGeneration")
    MODELS_CONFIG_MAP[ARCHITECTURE] = EngineChecks
