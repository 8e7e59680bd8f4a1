"""The model-size registry: one entry per ``model=<name>`` (torch-free).

Each :class:`ModelSize` names its backbone family and that family's architecture. The DiT
builder, the planner, the FLOP counter and the report's size order read it;
``configs/model/<name>.yaml`` is generated from it (:func:`model_yaml`, written by
:func:`write_model_yamls`; a test keeps the files in step), so a new size is one entry here
and a regenerated file.

A model config carries only its own backbone's config fields (:data:`CONFIG_FIELDS`): a DiT
is chosen by name (its width and depth live here, not in ``model.*``); the MLP's width and
depth are ``model.width`` / ``model.depth``.  ``ModelConfig`` keeps the MLP fields at their
defaults for a DiT, so the training keys of existing runs are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FIELDS = {"dit": ("conditioning_mode",), "mlp": ("width", "depth")}
"""Per backbone family: the ``model.*`` fields its YAML sets (and a user may override)."""


@dataclass(frozen=True)
class ModelSize:
    name: str
    backbone: str                                  # family: a key of CONFIG_FIELDS
    arch: dict[str, Any] = field(default_factory=dict)  # the family's architecture at this size
    config: dict[str, Any] = field(default_factory=dict)  # its model.* config fields (CONFIG_FIELDS)
    note: str = ""                                 # one line for the YAML's header


MODEL_SIZES: dict[str, ModelSize] = {}
"""Every model by name, from small to large (the report's order where parameter counts are
not recorded)."""


def register(size: ModelSize) -> ModelSize:
    unknown = set(size.config) - set(CONFIG_FIELDS.get(size.backbone, ()))
    if size.backbone not in CONFIG_FIELDS or unknown:
        raise ValueError(f"model size {size.name}: backbone={size.backbone!r}, config fields {sorted(size.config)}; "
                         f"expected a backbone of {sorted(CONFIG_FIELDS)} and only its fields")
    MODEL_SIZES[size.name] = size
    return size


def size_order() -> list[str]:
    return list(MODEL_SIZES)


def dit_sizes() -> dict[str, dict[str, Any]]:
    """``{name: {hidden, depth, heads, patch_size}}`` of the registered DiT sizes."""
    return {s.name: dict(s.arch) for s in MODEL_SIZES.values() if s.backbone == "dit"}


def model_yaml(name: str) -> str:
    """The ``configs/model/<name>.yaml`` text of a registered size."""
    size = MODEL_SIZES[name]
    arch = ", ".join(f"{k} {v}" for k, v in size.arch.items())
    lines = [f"# {size.note} ({size.backbone}{': ' + arch if arch else ''})",
             "# Generated from the registry in benchmark/backbones/sizes.py (write_model_yamls); edit it there.",
             f"name: {name}", f"backbone: {size.backbone}"]
    lines += [f"{k}: {v}" for k, v in size.config.items()]
    return "\n".join(lines) + "\n"


def write_model_yamls(folder: Path | None = None) -> list[Path]:
    """Write ``configs/model/<name>.yaml`` of every registered size (atomically); returns the
    files whose text changed."""
    from benchmark.config import CONFIG_DIR
    from benchmark.store import atomic_write_bytes

    folder = folder or CONFIG_DIR / "model"
    changed = []
    for name in MODEL_SIZES:
        path, text = folder / f"{name}.yaml", model_yaml(name)
        if not path.is_file() or path.read_text() != text:
            atomic_write_bytes(path, text.encode())
            changed.append(path)
    return changed


def _dit(name: str, hidden: int, depth: int, heads: int, note: str) -> ModelSize:
    return ModelSize(name, "dit", dict(hidden=hidden, depth=depth, heads=heads, patch_size=2),
                     {"conditioning_mode": "adaln"}, note)


for _size in (
    # width 256: 128 left MeanFlow/iMF with adaptive_p=1 short of W2 0.05 on gaussian1d (docs/methods.md)
    ModelSize("mlp", "mlp", {}, {"width": 256, "depth": 4}, "FiLM-conditioned MLP for 1-D/2-D toy data"),
    _dit("dit-tiny",      64,   4,  4,  "8x8 digits on CPU, ~0.33M parameters on 8x8x1"),
    _dit("dit-small-cpu", 128,  6,  4,  "CPU, ~1.9M parameters"),
    _dit("dit-s",         384,  12, 6,  "DiT-S/2, ~33M parameters"),
    _dit("dit-b",         768,  12, 12, "DiT-B/2, ~130M parameters"),
    _dit("dit-l",         1024, 24, 16, "DiT-L/2, ~458M parameters"),
    _dit("dit-xl",        1152, 28, 16, "DiT-XL/2, ~675M parameters"),
):  # fmt: skip
    register(_size)
