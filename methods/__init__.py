"""Plug-in methods.  ``get_method(name)`` returns the implementation class (imports torch);
``methods.specs.get_spec(name)`` the torch-free declarations."""

from __future__ import annotations

import importlib

from methods.specs import METHOD_NAMES, get_spec

_IMPLEMENTATIONS = {
    "fm": "methods.fm:FlowMatching",
    "meanflow": "methods.meanflow:MeanFlow",
    "imf": "methods.imf:ImprovedMeanFlow",
    "shortcut": "methods.shortcut:Shortcut",
    "scm": "methods.scm:SCM",
}


def get_method(name: str) -> type:
    """The ``Method`` subclass registered under ``name``."""
    get_spec(name)  # one clear error for an unknown name
    module, cls = _IMPLEMENTATIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["METHOD_NAMES", "get_method", "get_spec"]
