"""Torch-free registry of method specs: the planner's only view of the methods.

The registry is discovered, not kept by hand: a method is a module ``methods/specs/<name>.py``
that defines a :class:`MethodSpec` subclass whose ``name`` is ``<name>``.  Modules without
such a class (``base``, a family's shared declarations) are not methods.  The package is
fixed, so a config names a method, never a Python object; the spec's ``implementation``
(``"methods.<module>:<Class>"``) may only name a class inside the ``methods`` package.
``METHOD_NAMES`` is ordered by each spec's ``order`` (the column order of every table).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re

from methods.specs.base import InvalidPoint, MethodConfig, MethodSpec

_IMPLEMENTATION = re.compile(r"^methods\.[a-z_][a-z0-9_]*:[A-Za-z_][A-Za-z0-9_]*$")
"""``methods.<module>:<Class>``: one module directly inside the methods package."""


def _declared_spec(module_name: str) -> type[MethodSpec] | None:
    """The method spec class ``methods/specs/<module_name>.py`` declares, or None."""
    module = importlib.import_module(f"{__name__}.{module_name}")
    found = [obj for obj in vars(module).values()
             if isinstance(obj, type) and issubclass(obj, MethodSpec) and obj.__module__ == module.__name__
             and "name" in vars(obj)]
    if not found:
        return None
    if len(found) > 1 or found[0].name != module_name:
        names = ", ".join(f"{c.__name__}(name={c.name!r})" for c in found)
        raise TypeError(f"methods/specs/{module_name}.py must declare one spec named {module_name!r}; found {names}")
    spec = found[0]
    if not _IMPLEMENTATION.match(getattr(spec, "implementation", "")):
        raise TypeError(f"{spec.__name__}.implementation={getattr(spec, 'implementation', None)!r}; expected "
                        f"'methods.<module>:<Class>', a class inside the methods package")
    return spec


@functools.cache
def _registry() -> dict[str, type[MethodSpec]]:
    modules = [m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg and m.name != "base"]
    specs = {name: spec for name in modules if (spec := _declared_spec(name)) is not None}
    return dict(sorted(specs.items(), key=lambda item: (item[1].order, item[0])))


METHOD_NAMES: tuple[str, ...] = tuple(_registry())
"""Every registered method, in table order (each spec's ``order``)."""


def get_spec(name: str) -> MethodSpec:
    if name not in _registry():
        raise KeyError(f"unknown method '{name}'; expected one of: {', '.join(METHOD_NAMES)}")
    return _registry()[name]()


def step_cost_baseline() -> str:
    """The method every step-cost ratio divides by: the one spec with ``step_cost_baseline``."""
    baselines = [name for name in METHOD_NAMES if get_spec(name).step_cost_baseline]
    if len(baselines) != 1:
        raise TypeError(f"exactly one spec must set step_cost_baseline = True; found {baselines or 'none'}")
    return baselines[0]


__all__ = ["InvalidPoint", "MethodConfig", "MethodSpec", "METHOD_NAMES", "get_spec", "step_cost_baseline"]
