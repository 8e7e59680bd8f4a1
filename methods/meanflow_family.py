"""What MeanFlow (methods/meanflow.py) and iMF (methods/imf.py) share: both learn the
average velocity u(z, r, t) over [r, t] and sample with z_r = z_t - (t - r) u.
docs/methods.md §4, §5, §6.11.  Not a method of its own (its declarations:
methods/specs/meanflow_family.py).

Convention (the suite's): ``t = 1`` is noise, ``t = 0`` data, ``z_t = (1 - t) x + t eps``,
``v = eps - x``.

A training step of either method runs, in this order (the order of the random draws is
part of it: a run is reproducible only if it never changes):

1. :meth:`MeanFlowFamily.noisy_batch`: (t, r) from :func:`sample_time_pair`, then eps,
   z_t and v = eps - x;
2. the method's own inputs (iMF: the CFG interval and omega);
3. :meth:`MeanFlowFamily.training_field`: the method's ``guided_field`` from the labels
   before the drop, then the label drop (:func:`drop_labels_ordered`); dropped samples get
   the null label and v_g = v (the official order of both codes);
4. the method's JVP pass and target;
5. :meth:`MeanFlowFamily.adaptive_loss`: mean_b D_b / stopgrad((D_b + c)^p), D_b the
   per-sample sum of squares.

Sampling is :func:`sample_average_velocity` with the method's own network call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from methods.base import Method, broadcast_time, sample_logit_normal
from methods.specs.meanflow_family import MeanFlowFamilyConfig


def sample_time_pair(
    n: int,
    *,
    mean: float,
    std: float,
    ratio_r_neq_t: float,
    selection: str,
    generator: torch.Generator,
    device: torch.device | str,
    r_mean: float | None = None,
    r_std: float | None = None,
    pairing: str = "sort",
) -> tuple[Tensor, Tensor]:
    """(t, r), each (n,), with 0 < r <= t < 1 (t = 1 is noise).

    t and r are logit-normal draws (r from its own law when ``r_mean``/``r_std`` are given).
    ``pairing="sort"`` takes (max, min) and then sets r = t on the chosen samples (official
    JAX, py-meanflow v0); ``"clamp"`` sets r = t first and then r = min(t, r), so t keeps
    its own law (py-meanflow v1).  ``selection="first"``: r = t for the first
    floor(n (1 - ratio_r_neq_t)) samples; ``"random"``: each with probability 1 - ratio.
    """
    t = sample_logit_normal(n, mean, std, generator, device)
    r = sample_logit_normal(
        n, mean if r_mean is None else r_mean, std if r_std is None else r_std, generator, device
    )
    equal = r_equals_t_mask(n, ratio_r_neq_t, selection, generator, device)
    if pairing == "sort":
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        return t, torch.where(equal, t, r)
    if pairing == "clamp":
        return t, torch.minimum(t, torch.where(equal, t, r))
    raise ValueError(f"method.tr_pairing='{pairing}' is unknown; expected sort or clamp")


def r_equals_t_mask(
    n: int, ratio_r_neq_t: float, selection: str, generator: torch.Generator,
    device: torch.device | str,
) -> Tensor:
    """(n,) bool, True where r = t (the flow-matching part of the batch)."""
    if selection == "first":
        # the small offset keeps e.g. n * (1 - 0.7) = 2.9999... from flooring to 2
        count = math.floor(n * (1.0 - ratio_r_neq_t) + 1e-9)
        return torch.arange(n, device=device) < count
    if selection == "random":
        return torch.rand(n, generator=generator, device=device) < 1.0 - ratio_r_neq_t
    raise ValueError(f"method.r_neq_t_selection='{selection}' is unknown; expected first or random")


def drop_labels_ordered(
    y: Tensor, p: float, null_label: int, position: str, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(labels with the null label on dropped samples, (B,) bool dropped mask).

    ``position="first"`` drops the first Binomial(B, p) samples, as the official MeanFlow
    and iMF code (they fall in the r = t block); ``"random"`` drops each independently.
    """
    hit = torch.rand(y.shape, generator=generator, device=y.device) < p
    if position == "first":
        hit = torch.arange(y.shape[0], device=y.device) < hit.sum()
    elif position != "random":
        raise ValueError(
            f"method.label_drop_position='{position}' is unknown; expected first or random"
        )
    return torch.where(hit, torch.full_like(y, null_label), y), hit


def adaptive_weighted_loss(residual: Tensor, p: float, c: float) -> tuple[Tensor, Tensor]:
    """MeanFlow's adaptive weight: (mean_b D_b / stopgrad((D_b + c)^p), D) where
    D_b = sum over all non-batch dims of residual^2, residual (B, *shape), D (B,).
    p = 0 is the plain summed L2 loss."""
    dist = residual.pow(2).flatten(1).sum(dim=1)
    weight = (dist.detach() + c).pow(p)
    return (dist / weight).mean(), dist


def sample_average_velocity(
    u_fn: Callable[[Tensor, Tensor, Tensor], Tensor], noise: Tensor, nfe: int
) -> Tensor:
    """Integrate from t = 1 (noise (B, *shape)) to t = 0 on the grid linspace(1, 0, nfe + 1):
    z <- z - (t - r) u_fn(z, t, r), with t, r of shape (B,).  One call of ``u_fn`` per step."""
    grid = torch.linspace(1.0, 0.0, nfe + 1, dtype=noise.dtype, device=noise.device)
    z, batch = noise, noise.shape[0]
    for i in range(nfe):
        t, r = grid[i].expand(batch), grid[i + 1].expand(batch)
        z = z - broadcast_time(t - r, z) * u_fn(z, t, r)
    return z


class MeanFlowFamily(Method):
    """Base of MeanFlow and iMF: the steps of a training step both share (module doc).
    A subclass implements ``guided_field`` and may widen the r law with ``r_law``."""

    cfg: MeanFlowFamilyConfig

    def r_law(self) -> dict[str, Any]:
        """Extra arguments of :func:`sample_time_pair` (MeanFlow's own r law and pairing)."""
        return {}

    def noisy_batch(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(t, r, z_t, v = eps - x) for data x (B, *shape): t, r (B,) in x's dtype."""
        cfg = self.cfg
        t, r = sample_time_pair(
            x.shape[0], mean=cfg.time_mean, std=cfg.time_std, ratio_r_neq_t=cfg.ratio_r_neq_t,
            selection=cfg.r_neq_t_selection, generator=generator, device=x.device, **self.r_law(),
        )
        t, r = t.to(x.dtype), r.to(x.dtype)
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        z = (1 - broadcast_time(t, x)) * x + broadcast_time(t, x) * eps
        return t, r, z, eps - x

    def guided_field(
        self, net: nn.Module, z: Tensor, t: Tensor, v: Tensor, y: Tensor, **inputs: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """(v_g, v_c): the method's training field built from the sample velocity v with
        the labels y before the drop, and the network's conditional velocity when the
        method computed one to use later (iMF's JVP tangent), else None."""
        raise NotImplementedError

    def training_field(
        self, net: nn.Module, z: Tensor, t: Tensor, v: Tensor, y: Tensor,
        generator: torch.Generator, **inputs: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(v_g, labels for the u-net (B,), v_c): ``guided_field`` from the labels before
        the drop, then v_g = v and the null label on dropped samples (official order)."""
        v_g, v_c = self.guided_field(net, z, t, v, y, **inputs)
        y_in, dropped = self.drop_labels(y, generator)
        return torch.where(broadcast_time(dropped, v), v, v_g).detach(), y_in, v_c

    def drop_labels(self, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Labels fed to the u-net and the (B,) dropped mask; unconditional data keep the
        null label and drop nothing."""
        if self.num_classes == 0:
            return y, torch.zeros_like(y, dtype=torch.bool)
        return drop_labels_ordered(
            y, self.cfg.label_dropout, self.null_label, self.cfg.label_drop_position, generator
        )

    def adaptive_loss(self, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, per-sample summed squares D (B,)) with the configured p and c."""
        return adaptive_weighted_loss(residual, self.cfg.adaptive_p, self.cfg.adaptive_c)
