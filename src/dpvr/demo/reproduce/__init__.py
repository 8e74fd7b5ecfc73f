"""`dpvr reproduce`: see `command.py` for what it runs; `plan.py` the rows, `measure.py` the LR sweep,
cost ratios and gradients, `claims.py` convergence and verdicts, `report.py` the outputs."""
from dpvr.demo.reproduce.command import add_arguments, run

__all__ = ["add_arguments", "run"]
