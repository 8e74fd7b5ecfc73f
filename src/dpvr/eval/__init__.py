"""Evaluation: the paper's metrics on the digit-scenes benchmark, and the lmms-eval plugin.

    from dpvr.eval import evaluate
    result = evaluate(model, processor, data_dir)      # result["scores"]["pope"]["f1"], ...
"""
from dpvr.eval.metrics import FAMILIES, score_all
from dpvr.eval.runner import evaluate, format_table

__all__ = ["FAMILIES", "evaluate", "format_table", "score_all"]
