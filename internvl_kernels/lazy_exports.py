"""Package attributes imported on first use (PEP 562), so importing a package does not import all of it.

``__getattr__ = lazy_exports(__name__, {"Name": "pkg.module", ...})``: ``pkg.Name`` imports ``pkg.module`` on
first access and returns its attribute ``Name`` (or the module itself when ``Name`` is the module's own name).
The module paths are written out in full so tests/test_layering.py sees these imports.
"""
from __future__ import annotations

import importlib

__all__ = ["lazy_exports"]


def lazy_exports(package: str, where: dict[str, str]):
    def __getattr__(name: str):
        target = where.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        mod = importlib.import_module(target)  # not ``from . import x``: that would ask __getattr__ for x again
        return mod if target.rpartition(".")[2] == name else getattr(mod, name)

    return __getattr__
