"""Backbone registry: the model-size axis.  ``build_backbone`` is the one constructor the
engine uses; the family comes from the model config, the size from its name (the sizes are
registered in :mod:`benchmark.backbones.sizes`).  Importing the package is torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from benchmark.backbones.sizes import dit_sizes
from benchmark.schema import ModelConfig, UserError

if TYPE_CHECKING:
    from torch import nn


def _build_dit(model: ModelConfig, shape, num_classes, slots, options) -> nn.Module:
    from benchmark.backbones.dit import build_dit

    if model.name not in dit_sizes():
        raise UserError(f"unknown model '{model.name}'; expected one of: {', '.join(dit_sizes())}")
    if len(shape) != 3:
        raise UserError(f"model={model.name} needs image data (C, H, W), got shape {shape}")
    opts = {"conditioning_mode": model.conditioning_mode, "label_init_std": model.label_init_std, **options}
    return build_dit(model.name, in_channels=shape[0], image_size=shape[1],
                     num_classes=num_classes, slots=slots, **opts)


def _build_mlp(model: ModelConfig, shape, num_classes, slots, options) -> nn.Module:
    from benchmark.backbones.mlp import MLPBackbone

    opts = {k: v for k, v in options.items() if k != "conditioning_mode"}  # MLP: FiLM only
    return MLPBackbone(shape=tuple(shape), num_classes=num_classes, slots=slots,
                       width=model.width, depth=model.depth, **opts)


BACKBONES = {"dit": _build_dit, "mlp": _build_mlp}


def build_backbone(model: ModelConfig, *, shape: tuple[int, ...], num_classes: int,
                   slots: tuple[str, ...], options: dict[str, Any] | None = None) -> nn.Module:
    """The backbone for ``model`` with the conditioning slots and options a method needs."""
    return BACKBONES[model.backbone](model, shape, num_classes, tuple(slots), options or {})
