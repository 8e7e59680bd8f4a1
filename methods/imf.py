"""Improved MeanFlow (iMF; Geng, Lu et al., arXiv 2512.02012).  docs/methods.md §5; official
code Lyy-iiis/imeanflow (``imf.py``, ``models/imfDiT.py``).

Convention (the suite's): ``t = 1`` is noise, ``z_t = (1 - t) x + t eps``, ``v = eps - x``.
The network is u(z, h = t - r, omega, t_min, t_max, y) with no t input (the official imfDiT
is noise-conditioning-free; ``time_input=True`` adds a t slot for toy data).  omega enters
the "omega" slot as 1 - 1/omega (the imfDiT embeds that value), which maps omega in
[1, inf) to [0, 1) and omega = 1 (no guidance) to 0.

Training step (official ``iMeanFlow.forward``):

1. (t, r) as MeanFlow (methods/meanflow_family.py ``sample_time_pair``) with r = t on the first 50%.
2. CFG interval t_min ~ U[0, 0.5], t_max ~ U[0.5, 1], forced to [0, 1] where r = t;
   omega ~ density omega^-beta on [1, omega_max] (beta = 1: omega = 8^U, log-uniform).
3. v-predictions at h = 0 without gradient, in one doubled batch:
   v_c = v(z | y, omega'), v_u = v(z | null, 1), where omega' = omega for t in [t_min, t_max]
   and 1 outside.  The official code makes three calls (v_c at omega and v_u at 1 doubled,
   then v_c again at omega'); where t is inside, omega' = omega, and where it is outside
   the v_c - v_u term has weight 1 - 1/1 = 0, so one doubled call at omega' gives the same
   v_c (the JVP tangent) and v_g.  ``uncond_omega=omega`` feeds omega' to v_u instead (the
   paper's Algorithm 2, issue #8).  v comes from the u-net's boundary u(z, t, t) (default,
   ``v_head=boundary``) or from the auxiliary head (``v_head=aux``, released code).  The
   v-calls feed the interval [0, 1] and h = 0, as the official ``v_cond_fn``.
4. v_g = (eps - x) + (1 - 1/omega')(v_c - v_u), i.e. eps - x outside the interval.
5. Label drop p = 0.1 on the first Binomial(B, p) samples (docs/methods.md §5/§6.11; option
   ``label_drop_position=random``, which a later revision of the released imf.py uses):
   dropped samples get the null label in the u-call and v_g = eps - x.  v_c keeps the
   original label, as in the official code (the drop comes after the guidance).
6. One JVP pass of u(. | y, omega, t_min, t_max) with tangent v_c on z (the network's
   predicted v, not eps - x) and 1 on h (and on t with ``time_input``): u with gradient and
   du/dt detached; with the aux head the aux output comes from the same pass.  The u-call
   gets the sampled omega (not omega'): the network learns where its interval applies.
7. V = u + (t - r) stopgrad(du/dt); loss = psi(||V - v_g||^2) (+ psi(||v_aux - v_g||^2)),
   psi the MeanFlow adaptive weight on the per-sample sum over dims (p = 1, c = 0.01).
   ||V - v_g||^2 equals MeanFlow's ||u - (v_g - (t - r) du/dt)||^2 exactly.

Unconditional data (num_classes = 0): no CFG, omega = 1, v_g = eps - x, the interval is fed
as [0, 1] to every sample (it has no meaning without guidance; the official code is
class-conditional only), and the v-call is a single B-sized batch (it still gives the JVP
tangent).

Cost per step (boundary head): a 2B no-grad forward, one JVP pass (primal + tangent) and
one backward: about 2.2x a Flow Matching step where a backward costs two forwards.  On CPU
with dit-tiny, where the forward weighs more, it measured 2.8x (FM with the same in-context
backbone) to 3.3x (adaLN); MeanFlow without guidance measured 1.4-1.5x.

Sampling (official ``generate``): grid linspace(1, 0, N + 1),
z <- z - (t - r) u(z, h = t - r, omega, t_min, t_max, y), one pass per step at any guidance.
At guidance = 1 the interval is fed as [0, 1] whatever ``interval_min/max`` say: with no
guidance the interval has no meaning, and [0, 1] is what the r = t training samples see.

Dropout and RNG: the shared backbones have no dropout; the JVP gives primal and tangent
from one call (docs/methods.md §6.4).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from methods.base import Batch, NoiseFn, broadcast_time
from methods.jvp import backbone_jvp
from methods.meanflow_family import MeanFlowFamily, sample_average_velocity
from methods.specs.imf import ImprovedMeanFlowConfig, ImprovedMeanFlowSpec

# ----------------------------------------------------------------------------------------
# Inputs


def omega_input(omega: Tensor) -> Tensor:
    """The value fed to the "omega" slot: 1 - 1/omega (imfDiT), (B,) -> (B,)."""
    return 1.0 - 1.0 / omega


def imf_condition(
    t: Tensor, r: Tensor, omega: Tensor, t_min: Tensor, t_max: Tensor, time_input: bool
) -> dict[str, Tensor]:
    """Conditioning dict for u(z, h = t - r, omega, t_min, t_max); all (B,).  t itself is
    fed only with ``time_input``."""
    cond = {"h": t - r, "omega": omega_input(omega), "t_min": t_min, "t_max": t_max}
    return {"t": t, **cond} if time_input else cond


def time_tangents(cond: dict[str, Tensor]) -> dict[str, float]:
    """Input tangents of d/dt at fixed r: h = t - r moves with t, and so does t if fed."""
    return {"t": 1.0, "h": 1.0} if "t" in cond else {"h": 1.0}


def sample_omega(
    n: int, omega_max: float, beta: float, generator: torch.Generator, device: torch.device | str
) -> Tensor:
    """(n,) draws from the density ~ omega^-beta on [1, omega_max] by inverting its CDF;
    beta = 1 is log-uniform, omega = omega_max^U (official ``sample_cfg_scale``)."""
    u = torch.rand(n, generator=generator, device=device)
    if beta == 1.0:
        return torch.exp(u * math.log(omega_max))
    log_base = (1.0 - beta) * math.log(omega_max)
    return torch.exp(torch.log1p(u * math.expm1(log_base)) / (1.0 - beta))


def sample_interval(
    n: int, split: float, r_equals_t: Tensor, generator: torch.Generator,
    device: torch.device | str,
) -> tuple[Tensor, Tensor]:
    """(t_min, t_max), each (n,): U[0, split] and U[split, 1], set to [0, 1] where r = t."""
    t_min = split * torch.rand(n, generator=generator, device=device)
    t_max = split + (1.0 - split) * torch.rand(n, generator=generator, device=device)
    return t_min.masked_fill(r_equals_t, 0.0), t_max.masked_fill(r_equals_t, 1.0)


# ----------------------------------------------------------------------------------------
# Target and compound velocity


def imf_guided_field(v: Tensor, v_c: Tensor, v_u: Tensor, omega: Tensor) -> Tensor:
    """v_g = v + (1 - 1/omega)(v_c - v_u); fields (B, *shape), omega (B,) already 1 where t
    is outside the interval."""
    return v + broadcast_time(1.0 - 1.0 / omega, v) * (v_c - v_u)


def compound_velocity(
    net: nn.Module, z: Tensor, cond: dict[str, Tensor], y: Tensor, v_c: Tensor, gap: Tensor,
    *, aux: bool = False, tangents: dict[str, float] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(V = u + (t - r) stopgrad(du/dt), aux output or None), from one JVP pass.

    z, v_c (B, *shape); gap = t - r (B,).  The z-tangent is v_c; ``tangents`` on the
    condition slots default to d/dt at fixed r (:func:`time_tangents`).  u and the aux
    output keep their autograd graph; du/dt is detached."""
    tangents = time_tangents(cond) if tangents is None else tangents
    v_aux = None
    if aux:
        (u, v_aux), (dudt, _) = backbone_jvp(
            net, z, cond, y, v_c, tangents, return_aux=True, primal_grad=True
        )
    else:
        u, dudt = backbone_jvp(net, z, cond, y, v_c, tangents, primal_grad=True)
    return u + broadcast_time(gap, u) * dudt, v_aux


# ----------------------------------------------------------------------------------------
# The method


class ImprovedMeanFlow(MeanFlowFamily):
    spec = ImprovedMeanFlowSpec()
    cfg: ImprovedMeanFlowConfig

    def backbone_options(self) -> dict[str, Any]:
        aux_depth = self.cfg.aux_depth if self.cfg.v_head == "aux" else 0
        return {"aux_depth": aux_depth}

    def loss(
        self, net: nn.Module, batch: Batch, *, step: int, generator: torch.Generator,
        teacher: nn.Module | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """psi(||V - v_g||^2) (+ psi(||v_aux - v_g||^2) with the aux head) for a batch x
        (B, *shape); logs the loss and the per-element squared errors."""
        cfg, x = self.cfg, batch.x
        n, device = x.shape[0], x.device
        t, r, z, v = self.noisy_batch(x, generator)
        # unconditional data: no guidance (omega = 1), so the interval has no meaning; it is
        # fed as [0, 1] everywhere, as at sampling, instead of random inputs the net must
        # learn to ignore (and would meet as [0, 1] with h > 0 only at sampling)
        no_interval = (t == r) | (self.num_classes == 0)
        t_min, t_max = sample_interval(n, cfg.interval_split, no_interval, generator, device)
        t_min, t_max = t_min.to(x.dtype), t_max.to(x.dtype)
        omega = self.sample_omega(n, generator, device).to(x.dtype)
        v_g, y, v_c = self.training_field(net, z, t, v, batch.y, generator,
                                          omega=omega, t_min=t_min, t_max=t_max)
        cond = imf_condition(t, r, omega, t_min, t_max, cfg.time_input)
        aux = cfg.v_head == "aux"
        V, v_aux = compound_velocity(net, z, cond, y, v_c, t - r, aux=aux)
        loss, dist_u = self.adaptive_loss(V - v_g)
        logs = {"loss_u": dist_u.mean().item() / x[0].numel()}
        if aux:
            loss_v, dist_v = self.adaptive_loss(v_aux - v_g)
            loss = loss + loss_v
            logs["loss_v"] = dist_v.mean().item() / x[0].numel()
        return loss, {"loss": loss.item(), **logs}

    def sample_omega(self, n: int, generator: torch.Generator, device: torch.device | str) -> Tensor:
        """Training CFG scales (n,); all 1 for unconditional data (nothing to guide)."""
        omega = sample_omega(n, self.cfg.omega_max, self.cfg.omega_beta, generator, device)
        return omega if self.num_classes else torch.ones_like(omega)

    def velocity(self, net: nn.Module, z: Tensor, t: Tensor, omega: Tensor, y: Tensor) -> Tensor:
        """Predicted instantaneous velocity v(z, t | y, omega), (B, *shape): the v-head at
        h = 0 and interval [0, 1] (official dummy values), from the aux head or u(z, t, t)."""
        cond = imf_condition(t, t, omega, torch.zeros_like(t), torch.ones_like(t), self.cfg.time_input)
        if self.cfg.v_head == "aux":
            return net(z, cond, y, return_aux=True)[1]
        return net(z, cond, y)

    @torch.no_grad()
    def guided_field(
        self, net: nn.Module, z: Tensor, t: Tensor, v: Tensor, y: Tensor, *, omega: Tensor,
        t_min: Tensor, t_max: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """(v_g, v_c), both (B, *shape): the guided training field and the network's
        conditional velocity (the JVP tangent), from one doubled no-grad v-call."""
        inside = (t >= t_min) & (t <= t_max)
        omega_t = torch.where(inside, omega, torch.ones_like(omega))  # guidance off outside
        if self.num_classes == 0:
            return v, self.velocity(net, z, t, omega_t, y)
        omega_u = torch.ones_like(omega_t) if self.cfg.uncond_omega == "one" else omega_t
        null = torch.full_like(y, self.null_label)
        both = self.velocity(
            net, torch.cat([z, z]), torch.cat([t, t]), torch.cat([omega_t, omega_u]),
            torch.cat([y, null]),
        )
        v_c, v_u = both.chunk(2)
        return imf_guided_field(v, v_c, v_u, omega_t), v_c

    @torch.no_grad()
    def sample(
        self, net: nn.Module, noise: Tensor, labels: Tensor, *, nfe: int,
        guidance: float = 1.0, fresh_noise: NoiseFn | None = None,
        interval_min: float | None = None, interval_max: float | None = None, **eval_params: Any,
    ) -> Tensor:
        """noise (B, *shape) at t = 1 -> samples at t = 0 in ``nfe`` passes, with guidance
        scale ``guidance`` and interval [interval_min, interval_max] as network inputs."""
        lo = self.cfg.interval_min if interval_min is None else interval_min
        hi = self.cfg.interval_max if interval_max is None else interval_max
        self.spec.validate(replace(self.cfg, interval_min=lo, interval_max=hi), nfe, guidance)
        if guidance == 1.0:
            lo, hi = 0.0, 1.0  # no guidance: the interval means nothing; feed the r = t value
        omega, t_min, t_max = (
            torch.full((noise.shape[0],), float(value), dtype=noise.dtype, device=noise.device)
            for value in (guidance, lo, hi)
        )

        def u_fn(z: Tensor, t: Tensor, r: Tensor) -> Tensor:
            return net(z, imf_condition(t, r, omega, t_min, t_max, self.cfg.time_input), labels)

        return sample_average_velocity(u_fn, noise, nfe)
