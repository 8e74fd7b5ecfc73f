"""`dpvr demo`: the whole pipeline on the embedded default, with an HTML report (see pipeline.py)."""
from dpvr.demo.pipeline import add_arguments, run

__all__ = ["add_arguments", "run"]
