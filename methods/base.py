"""The method plug-in contract (runtime side; the torch-free side is ``methods/specs``).

A method owns only its loss and its sampler.  The harness owns the optimizer, EMA,
checkpoints, data, seeds and NFE counting.

Backbone calling convention (``benchmark/backbones`` implements it; a bare ``nn.Module``
with the same signature works in tests)::

    out = net(x, cond, y)                      # x: (B, *shape); out: (B, *shape)
    out, aux = net(x, cond, y, return_aux=True)  # only for nets built with aux_depth > 0

- ``cond``: dict from slot name (``t, r, h, d, omega, t_min, t_max``) to a float tensor of
  shape (B,); exactly the slots the method's spec declares in ``conditioning(cfg)``.
- ``y``: long tensor (B,), labels ``0..K-1``; ``K`` (= ``num_classes``) is the null label.
  Unconditional data has ``num_classes = 0`` and every label is the null label 0.

Time convention: ``t = 1`` is noise, ``t = 0`` is data, ``z_t = (1 - t) x + t eps``,
conditional velocity ``v = eps - x``.  Methods with another native convention convert
inside their own module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from methods.specs.base import MethodConfig, MethodSpec


class Backbone(Protocol):
    def __call__(
        self, x: Tensor, cond: dict[str, Tensor], y: Tensor, return_aux: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]: ...


@dataclass
class Batch:
    """One training batch: ``x`` (B, *shape) data scaled to the dataset's range,
    ``y`` (B,) long labels (null label ``num_classes`` for unconditional data)."""

    x: Tensor
    y: Tensor


NoiseFn = Callable[[int], Tensor]
"""``fresh_noise(i)`` returns the i-th extra per-sample-seeded standard normal draw, shaped
like the initial noise; methods that inject noise while sampling (sCM 2-step) use it so
samples never depend on batch size."""


class Method(nn.Module):
    """Base class of every method.  Subclasses set ``spec`` and implement ``loss`` and
    ``sample``.  A method is an ``nn.Module`` so that the few methods with parameters of
    their own (sCM's adaptive-weight head) are trained and checkpointed by the harness;
    most methods have none."""

    spec: ClassVar[MethodSpec]

    def __init__(self, cfg: MethodConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes

    # -- declarations -------------------------------------------------------------------
    @property
    def conditioning(self) -> tuple[str, ...]:
        return self.spec.conditioning(self.cfg)

    def backbone_options(self) -> dict[str, Any]:
        """Backbone build options this method needs (e.g. ``aux_depth``,
        ``conditioning_mode``); merged over the model config by the harness."""
        return {}

    @property
    def null_label(self) -> int:
        return self.num_classes

    # -- the two things a method owns ------------------------------------------------------
    def loss(
        self,
        net: nn.Module,
        batch: Batch,
        *,
        step: int,
        generator: torch.Generator,
        teacher: nn.Module | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Scalar training loss and float logs.  All randomness from ``generator``.
        May call ``net`` several times or through a JVP; never steps the optimizer.
        ``teacher``: the method's own target network (an EMA of ``net`` at the decay its
        spec's ``teacher_decay`` declares, kept by the harness), or None when it declares
        none; it is never the evaluation EMA."""
        raise NotImplementedError

    def sample(
        self,
        net: nn.Module,
        noise: Tensor,
        labels: Tensor,
        *,
        nfe: int,
        guidance: float = 1.0,
        fresh_noise: NoiseFn | None = None,
        **eval_params: Any,
    ) -> Tensor:
        """Map noise (B, *shape) at t = 1 to samples at t = 0 with ``nfe`` steps.
        ``eval_params`` are the method's evaluation-axis config fields."""
        raise NotImplementedError


def drop_labels(y: Tensor, p: float, null_label: int, generator: torch.Generator) -> Tensor:
    """Replace each label by the null label independently with probability ``p`` (CFG)."""
    if p <= 0:
        return y
    keep = torch.rand(y.shape, generator=generator, device=y.device) >= p
    return torch.where(keep, y, torch.full_like(y, null_label))


def broadcast_time(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts against ``like`` (B, *shape)."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1)))


def sample_logit_normal(
    n: int, mean: float, std: float, generator: torch.Generator, device: torch.device | str
) -> Tensor:
    """sigmoid(N(mean, std^2)) draws, shape (n,)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def fallback_noise(like: Tensor, seed: int) -> Tensor:
    """Extra sampling noise when the caller gives no ``fresh_noise`` (ad-hoc use, never the
    harness): a fixed-seed local generator, so the global RNG is untouched and calls repeat,
    but the noise then depends on the batch.  Shaped like ``like``."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)
