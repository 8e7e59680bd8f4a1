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

Steps 1, 3 and the loss of step 5 are shared with iMF (methods/meanflow_family.py); this
module holds MeanFlow's own: its r law, the guided field of step 2 and the target of
steps 4-5.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from methods.base import Batch, NoiseFn, broadcast_time
from methods.jvp import backbone_jvp
from methods.meanflow_family import MeanFlowFamily, sample_average_velocity
from methods.specs.meanflow import MeanFlowConfig, MeanFlowSpec

D_DT_AT_FIXED_R = {"t": 1.0, "h": 1.0}
"""Tangents of the inputs (t, h = t - r) for d/dt at fixed r: dt/dt = 1, dh/dt = 1."""


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


def meanflow_guided_field(v: Tensor, v_c: Tensor, v_u: Tensor, omega: Tensor, kappa: Tensor) -> Tensor:
    """omega v + kappa v_c + (1 - omega - kappa) v_u; fields (B, *shape), omega/kappa (B,)
    already set to (1, 0) outside the guidance interval."""
    omega, kappa = broadcast_time(omega, v), broadcast_time(kappa, v)
    return omega * v + kappa * v_c + (1 - omega - kappa) * v_u


class MeanFlow(MeanFlowFamily):
    spec = MeanFlowSpec()
    cfg: MeanFlowConfig

    def loss(
        self, net: nn.Module, batch: Batch, *, step: int, generator: torch.Generator,
        teacher: nn.Module | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Adaptive-weighted ||u - u_tgt||^2 for a batch x (B, *shape); logs the loss and
        the per-element squared error."""
        x = batch.x
        t, r, z, v = self.noisy_batch(x, generator)
        v_g, y, _ = self.training_field(net, z, t, v, batch.y, generator)
        u, u_tgt = average_velocity_and_target(net, z, t, r, y, v_g)
        loss, dist = self.adaptive_loss(u - u_tgt)
        return loss, {"loss": loss.item(), "mse": dist.mean().item() / x[0].numel()}

    def r_law(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"r_mean": cfg.r_time_mean, "r_std": cfg.r_time_std, "pairing": cfg.tr_pairing}

    @torch.no_grad()
    def guided_field(
        self, net: nn.Module, z: Tensor, t: Tensor, v: Tensor, y: Tensor, **inputs: Tensor
    ) -> tuple[Tensor, None]:
        """(v_g (B, *shape), None): the training field from the sample velocity v = eps - x
        and no-grad forwards of the u-net at h = 0 (its boundary u(z, t, t) = v(z, t)).
        The JVP tangent is v_g itself, so no network velocity is kept."""
        cfg = self.cfg
        if self.num_classes == 0 or (cfg.omega == 1.0 and cfg.kappa == 0.0):
            return v, None
        inside = (t >= cfg.cfg_t_start) & (t <= cfg.cfg_t_end)
        omega = torch.where(inside, torch.full_like(t, cfg.omega), torch.ones_like(t))
        kappa = torch.where(inside, torch.full_like(t, cfg.kappa), torch.zeros_like(t))
        null = torch.full_like(y, self.null_label)
        if cfg.kappa == 0.0:  # v_c has weight 0: only the unconditional pass
            v_u = net(z, {"t": t, "h": torch.zeros_like(t)}, null)
            return meanflow_guided_field(v, torch.zeros_like(v), v_u, omega, kappa), None
        tt = torch.cat([t, t])
        both = net(torch.cat([z, z]), {"t": tt, "h": torch.zeros_like(tt)}, torch.cat([y, null]))
        v_c, v_u = both.chunk(2)
        return meanflow_guided_field(v, v_c, v_u, omega, kappa), None

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
