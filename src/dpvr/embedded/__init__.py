"""The embedded default: a tiny LLaVA trained here on digit scenes, shipped in dpvr/assets/tiny-llava/.

    from dpvr.embedded import default_model_path, build_tiny_model
"""
from __future__ import annotations

from pathlib import Path

from dpvr.lazy import lazy_names

__all__ = ["build_tiny_model", "default_model_path"]
__getattr__, __dir__ = lazy_names(__name__, {"build_tiny_model": "dpvr.embedded.model"})


def default_model_path() -> str:
    """The shipped checkpoint dir (loadable by LlavaForConditionalGeneration / AutoProcessor.from_pretrained)."""
    return str(Path(__file__).resolve().parent.parent / "assets" / "tiny-llava")
