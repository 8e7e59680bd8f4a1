"""MeanFlow (Geng et al., arXiv 2505.13447): one-step generation by learning the average
velocity.  docs/methods.md §4; official code Gsunshine/meanflow (JAX, ImageNet) and
Gsunshine/py-meanflow (PyTorch, CIFAR-10).

Convention (the suite's): ``t = 1`` is noise, ``t = 0`` data, ``z_t = (1 - t) x + t eps``,
``v = eps - x``.  The network is ``u(z, t, h = t - r, y)`` with raw t and h in [0, 1]
(slots ``t`` and ``h``); the average velocity over [r, t] satisfies
``z_r = z_t - (t - r) u`` and the MeanFlow identity ``u = v - (t - r) du/dt``.

Training step (official ImageNet code):

1. t, r ~ logit-normal(-0.4, 1.0) iid, (t, r) = (max, min); r = t on the first
   (1 - ratio_r_neq_t) of the batch (official ``data_proportion``).  Options: a random
   per-sample mask (py-meanflow) and a separate r law paired by clamping (py-meanflow v1).
2. Guided field: v_g = omega v + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | null)
   for t in [cfg_t_start, cfg_t_end], else v; the network terms are no-grad forwards at h = 0
   in one batch (conditional and unconditional doubled; only the unconditional one when
   kappa = 0; none when omega = 1, kappa = 0 or the data are unconditional).
3. Label drop p = 0.1 on the first Binomial(B, p) samples (official; they fall in the r = t
   block), or at random positions; dropped samples get v_g = v.  Guidance uses the labels
   before the drop, as the official code does.
4. One forward-mode JVP through the backbone with tangents (v_g, 1, 0) on (z, t, r), i.e.
   ``t: 1, h: 1``, gives u (on the autograd graph) and du/dt (detached) in one pass.
5. u_tgt = stopgrad(v_g - clip(t - r, 0, 1) du/dt); per-sample D = sum over dims of
   (u - u_tgt)^2; loss = mean_batch D / stopgrad((D + c)^p), p = 1, c = 0.01 (ImageNet;
   CIFAR p = 0.75, c = 1e-3; toys p = 0, docs/methods.md §10).

Sampling: uniform grid t_i = 1 - i/N, z <- z - (t_i - t_{i+1}) u(z, t_i, h = t_i - t_{i+1}),
one pass per step, any N >= 1.  No CFG at sampling: guidance is baked in at training, so
``sample`` ignores its ``guidance`` argument (the harness maps the guidance axis onto the
training field ``omega``).

Dropout and RNG: the shared backbones have no dropout, and the single JVP pass yields
primal and tangent from the same call, so they see identical randomness by construction
(docs/methods.md §6.4).  The guidance forwards use the online network, as the official code.

The helpers shared with iMF live here: the (t, r) sampler, the ordered label drop, the
adaptive weight and the average-velocity sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from methods.base import Batch, Method, NoiseFn, broadcast_time, sample_logit_normal
from methods.jvp import backbone_jvp
from methods.specs.meanflow import MeanFlowConfig, MeanFlowSpec

D_DT_AT_FIXED_R = {"t": 1.0, "h": 1.0}
"""Tangents of the inputs (t, h = t - r) for d/dt at fixed r: dt/dt = 1, dh/dt = 1."""


# ----------------------------------------------------------------------------------------
# Shared with iMF


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


# ----------------------------------------------------------------------------------------
# MeanFlow's target


def meanflow_target(v_g: Tensor, t: Tensor, r: Tensor, dudt: Tensor) -> Tensor:
    """u_tgt = stopgrad(v_g - clip(t - r, 0, 1) du/dt); v_g, dudt (B, *shape), t, r (B,)."""
    return (v_g - broadcast_time((t - r).clamp(0.0, 1.0), v_g) * dudt).detach()


def average_velocity_and_target(
    net: nn.Module, z: Tensor, t: Tensor, r: Tensor, y: Tensor, v_g: Tensor,
    time_tangents: dict[str, float] = D_DT_AT_FIXED_R,
) -> tuple[Tensor, Tensor]:
    """(u(z, t, h = t - r | y) on the autograd graph, u_tgt), both (B, *shape), from one JVP
    pass with tangent v_g on z and ``time_tangents`` on (t, h).  The default is d/dt at
    fixed r; tests pass others as controls."""
    u, dudt = backbone_jvp(
        net, z, {"t": t, "h": t - r}, y, v_g, time_tangents, primal_grad=True
    )
    return u, meanflow_target(v_g, t, r, dudt)


def guided_velocity(v: Tensor, v_c: Tensor, v_u: Tensor, omega: Tensor, kappa: Tensor) -> Tensor:
    """omega v + kappa v_c + (1 - omega - kappa) v_u; fields (B, *shape), omega/kappa (B,)
    already set to (1, 0) outside the guidance interval."""
    omega, kappa = broadcast_time(omega, v), broadcast_time(kappa, v)
    return omega * v + kappa * v_c + (1 - omega - kappa) * v_u


# ----------------------------------------------------------------------------------------
# The method


class MeanFlow(Method):
    spec = MeanFlowSpec()
    cfg: MeanFlowConfig

    def loss(
        self, net: nn.Module, batch: Batch, *, step: int, generator: torch.Generator,
        teacher: nn.Module | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Adaptive-weighted ||u - u_tgt||^2 for a batch x (B, *shape); logs the loss and
        the per-element squared error."""
        cfg, x = self.cfg, batch.x
        t, r = sample_time_pair(
            x.shape[0], mean=cfg.time_mean, std=cfg.time_std, ratio_r_neq_t=cfg.ratio_r_neq_t,
            selection=cfg.r_neq_t_selection, generator=generator, device=x.device,
            r_mean=cfg.r_time_mean, r_std=cfg.r_time_std, pairing=cfg.tr_pairing,
        )
        t, r = t.to(x.dtype), r.to(x.dtype)
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        z = (1 - broadcast_time(t, x)) * x + broadcast_time(t, x) * eps
        v = eps - x
        v_g, y = self.training_field(net, z, t, v, batch.y, generator)
        u, u_tgt = average_velocity_and_target(net, z, t, r, y, v_g)
        loss, dist = adaptive_weighted_loss(u - u_tgt, cfg.adaptive_p, cfg.adaptive_c)
        return loss, {"loss": loss.item(), "mse": dist.mean().item() / x[0].numel()}

    def training_field(
        self, net: nn.Module, z: Tensor, t: Tensor, v: Tensor, y: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        """(v_g (B, *shape), labels for the u-net (B,)): the guided field from the labels
        before the drop, then v_g = v and the null label on dropped samples (official order)."""
        v_g = self.guided_target(net, z, t, v, y)
        y_in, dropped = self.drop_labels(y, generator)
        return torch.where(broadcast_time(dropped, v), v, v_g), y_in

    def drop_labels(self, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Labels fed to the u-net and the (B,) dropped mask; unconditional data keep the
        null label and drop nothing."""
        if self.num_classes == 0:
            return y, torch.zeros_like(y, dtype=torch.bool)
        return drop_labels_ordered(
            y, self.cfg.label_dropout, self.null_label, self.cfg.label_drop_position, generator
        )

    @torch.no_grad()
    def guided_target(self, net: nn.Module, z: Tensor, t: Tensor, v: Tensor, y: Tensor) -> Tensor:
        """The training field v_g (B, *shape) from the sample velocity v = eps - x and no-grad
        forwards of the u-net at h = 0 (its boundary u(z, t, t) = v(z, t))."""
        cfg = self.cfg
        if self.num_classes == 0 or (cfg.omega == 1.0 and cfg.kappa == 0.0):
            return v
        inside = (t >= cfg.cfg_t_start) & (t <= cfg.cfg_t_end)
        omega = torch.where(inside, torch.full_like(t, cfg.omega), torch.ones_like(t))
        kappa = torch.where(inside, torch.full_like(t, cfg.kappa), torch.zeros_like(t))
        null = torch.full_like(y, self.null_label)
        if cfg.kappa == 0.0:  # v_c has weight 0: only the unconditional pass
            v_u = net(z, {"t": t, "h": torch.zeros_like(t)}, null)
            return guided_velocity(v, torch.zeros_like(v), v_u, omega, kappa)
        tt = torch.cat([t, t])
        both = net(torch.cat([z, z]), {"t": tt, "h": torch.zeros_like(tt)}, torch.cat([y, null]))
        v_c, v_u = both.chunk(2)
        return guided_velocity(v, v_c, v_u, omega, kappa)

    @torch.no_grad()
    def sample(
        self, net: nn.Module, noise: Tensor, labels: Tensor, *, nfe: int,
        guidance: float = 1.0, fresh_noise: NoiseFn | None = None, **eval_params: Any,
    ) -> Tensor:
        """noise (B, *shape) at t = 1 -> samples at t = 0 in ``nfe`` passes.  ``guidance`` is
        ignored: MeanFlow's guidance is the training field ``omega``."""
        self.spec.validate(self.cfg, nfe, 1.0)
        return sample_average_velocity(
            lambda z, t, r: net(z, {"t": t, "h": t - r}, labels), noise, nfe
        )
