"""Evaluation: the paper's metrics on the digit-scenes benchmark, and the lmms-eval plugin.

    from dpvr.eval import evaluate
    result = evaluate(model, processor, data_dir)      # result["scores"]["pope"]["f1"], ...
"""
from dpvr.lazy import lazy_names

_LAZY = {
    "FAMILIES": "dpvr.eval.metrics",
    "score_all": "dpvr.eval.metrics",
    "evaluate": "dpvr.eval.runner",
    "format_table": "dpvr.eval.runner",
}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_names(__name__, _LAZY)
