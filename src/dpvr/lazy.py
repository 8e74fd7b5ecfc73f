"""Package namespaces whose names are imported on first use (PEP 562), so that importing a light part
of dpvr (the CLI's parser, the config) does not pay for torch, transformers or matplotlib.

    __getattr__, __dir__ = lazy_names(__name__, {"convert": "dpvr.routing", ...})
"""
from __future__ import annotations

import importlib
import sys


def lazy_names(package: str, table: dict[str, str]):
    """`__getattr__` and `__dir__` for module `package`: name -> the module that defines it."""

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name]), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *table})

    return __getattr__, __dir__
