"""Torch-free registry of method specs: the planner's only view of the methods."""

from __future__ import annotations

import importlib

from methods.specs.base import InvalidPoint, MethodConfig, MethodSpec

_SPECS = {
    "fm": "methods.specs.fm:FlowMatchingSpec",
    "meanflow": "methods.specs.meanflow:MeanFlowSpec",
    "imf": "methods.specs.imf:ImprovedMeanFlowSpec",
    "shortcut": "methods.specs.shortcut:ShortcutSpec",
    "scm": "methods.specs.scm:SCMSpec",
}
"""name -> "module:class".  A fixed table: configs name a method, never a Python object."""

METHOD_NAMES = tuple(_SPECS)


def get_spec(name: str) -> MethodSpec:
    if name not in _SPECS:
        raise KeyError(f"unknown method '{name}'; expected one of: {', '.join(_SPECS)}")
    module, cls = _SPECS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["InvalidPoint", "MethodConfig", "MethodSpec", "METHOD_NAMES", "get_spec"]
