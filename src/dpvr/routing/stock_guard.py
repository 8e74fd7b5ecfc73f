"""One clear line when the stock class loads a DPVR checkpoint. Without it, transformers prints a
model-type mismatch warning and a table of "UNEXPECTED" side-branch keys, and the model it returns
silently runs without routing. Installed when dpvr is imported (the side branch cannot be kept by a
class that has no place for it; `DPVRForConditionalGeneration.from_pretrained` keeps it)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger("dpvr")


def _dpvr_routing(path, model_type: str) -> dict | None:
    """The routing recorded in a local DPVR checkpoint folder, or None for anything else."""
    config = Path(str(path)) / "config.json"
    if not config.is_file():
        return None
    try:
        meta = json.loads(config.read_text())
    except (OSError, ValueError):
        return None  # not ours to judge: the stock loader reports it
    return (meta.get("dpvr") or {}) if meta.get("model_type") == model_type else None


def install(stock: type, model_type: str) -> None:
    """Wrap the stock class's from_pretrained: checkpoints of `model_type` (DPVR's) get the one-line warning."""
    original = stock.from_pretrained.__func__
    if getattr(original, "_dpvr_guard", False) and "from_pretrained" in vars(stock):
        return

    @functools.wraps(original)
    def from_pretrained(cls, path, *args, **kwargs):
        routing = None if getattr(cls.config_class, "model_type", None) == model_type else _dpvr_routing(path, model_type)
        if routing is None:
            return original(cls, path, *args, **kwargs)
        logger.warning(
            f"{path} is a DPVR checkpoint (mode {routing.get('mode', '?')!r}): {cls.__name__} loads it without routing "
            "and drops the side branch; load it with dpvr.DPVRForConditionalGeneration.from_pretrained to keep them"
        )
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the type-mismatch warning and the unexpected-keys table say the same, less clearly
        try:
            return original(cls, path, *args, **kwargs)
        finally:
            logging.set_verbosity(verbosity)

    from_pretrained._dpvr_guard = True
    stock.from_pretrained = classmethod(from_pretrained)
