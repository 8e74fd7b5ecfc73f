"""The checkpoints `python -m dpvr.serve.vllm.bench` times, and the analytic FLOPs it compares with.

A preset (dpvr.bench.presets, e.g. cpu-7b-narrow: LLaVA-1.5-7B's 32 layers, split 18 and 576 image tokens
at hidden 512) becomes a random-weight stock LLaVA that dpvr converts to LF and saves with a processor:
the embedded tiny LLaVA's tokenizer and chat template (so no download), its image processor resized to the
preset's vision tower, and the preset's image token moved to that tokenizer's `<image>` id.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from dpvr.errors import DPVRError


def tiny_lf(root: Path) -> Path:
    """The embedded tiny LLaVA converted to LF at dpvr's default split, untrained side branch."""
    return _converted(root / "tiny-lf", None)


def preset_lf(root: Path, preset: str) -> Path:
    """A random-weight model of the preset's shape, converted to LF (default split, K = 1)."""
    out = root / f"{preset}-lf"
    if not (out / "config.json").exists():
        stock = root / f"{preset}-stock"
        _save_random_stock(preset, stock)
        _converted(out, stock)
    return out


def _save_random_stock(preset: str, out: Path) -> None:
    import torch
    from transformers import AutoProcessor

    from dpvr.bench.presets import preset_config
    from dpvr.embedded import default_model_path
    from dpvr.routing.backbones import backbone_of

    config = preset_config(preset)
    if config.model_type != "llava":
        raise DPVRError(f"dpvr's vLLM plugin runs LLaVA-1.5 checkpoints; preset {preset!r} is {config.model_type}")
    processor = AutoProcessor.from_pretrained(default_model_path())
    config.image_token_index = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    side, patch = config.vision_config.image_size, config.vision_config.patch_size
    processor.image_processor.size = {"shortest_edge": side}
    processor.image_processor.crop_size = {"height": side, "width": side}
    processor.patch_size = patch
    torch.manual_seed(0)
    backbone_of(config).stock._from_config(config, dtype=torch.float32).save_pretrained(out)
    processor.save_pretrained(out)


def _converted(out: Path, stock: Path | None) -> Path:
    from dpvr.loading import load_model

    if not (out / "config.json").exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "untrained side branch": timing only
            net, processor = load_model(model=None if stock is None else str(stock), mode="lf")
        net.save_pretrained(out)
        processor.save_pretrained(out)
    return out


def analytic_prefill_saving(config, n_img: int, n_txt: int, batch: int) -> dict:
    """Forward FLOPs of one prefill step of `batch` image requests, vanilla and the checkpoint's routing
    (vision tower included; lm_head on each request's last token, as vLLM computes logits)."""
    from dpvr.bench.flops import forward_flops
    from dpvr.serve.vllm.checks import routing_of

    cfg = routing_of(config)
    kw = dict(n_img=n_img, n_txt=n_txt, batch=batch, logits_tokens=1)
    vanilla = forward_flops(config, "vanilla", split_layer=cfg.split_layer, **kw)["total"]
    routed = forward_flops(config, cfg.mode, split_layer=cfg.split_layer, fusion_layers=cfg.fusion_layers,
                           side_depth=cfg.side_depth, fusion_at=cfg.fusion_at, **kw)["total"]  # fmt: skip
    return {"vanilla_flops": vanilla, "routed_flops": routed, "saving": 1 - routed / vanilla}
