"""Plug-in methods.  ``get_method(name)`` returns the implementation class (imports torch);
``methods.specs.get_spec(name)`` the torch-free declarations.  Both are found from the spec
module ``methods/specs/<name>.py`` alone (its ``implementation`` names the class):
docs/adding-a-method.md."""

from __future__ import annotations

import importlib

from methods.specs import METHOD_NAMES, get_spec


def get_method(name: str) -> type:
    """The ``Method`` subclass registered under ``name``."""
    module, cls = get_spec(name).implementation.split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["METHOD_NAMES", "get_method", "get_spec"]
