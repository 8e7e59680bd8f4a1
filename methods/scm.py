"""sCM: continuous-time consistency training (sCT) in TrigFlow.  docs/methods.md §3.

Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models"
(arXiv 2410.11081); loss as in xandergos/sCM-mnist ``train_consistency.py`` and NVlabs/rcm.

TrigFlow, native to this module (the suite's ``t = 1`` noise convention is converted here):

- ``x_t = cos t x0 + sin t z``, ``z ~ N(0, sigma_d^2 I)``, ``t`` in [0, pi/2], **t = pi/2 is
  noise**, t = 0 data.  The suite's noise ``eps ~ N(0, I)`` enters as ``z = sigma_d eps``.
- Consistency function ``f(x_t, t) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t)``; the
  boundary condition ``f(x, 0) = x`` holds exactly.
- ``parameterization=trigflow`` (default): the backbone is ``F`` itself; its ``t`` slot
  carries TrigFlow t raw in [0, pi/2] (c_noise(t) = t, identity: log(sigma_d tan t) has an
  unbounded t-derivative at both ends, and the JVP differentiates through it).
  ``parameterization=fm``: the backbone is a suite-convention velocity net ``v(z_s, s)``,
  s in [0, 1] with s = 1 noise, in sigma_d units, and
  ``F = (cos t - sin t) z_s + v / (sin t + cos t)`` with ``z_s = x_t / (sigma_d (sin t + cos t))``,
  ``s = sin t / (sin t + cos t)`` (the verified conversion of docs/methods.md §3), so sCM can
  start from or share an FM-convention network.

Training step (sCT), per sample:

- ``tau ~ N(P_mean, P_std^2)``, ``t = arctan(e^tau / sigma_d)``; CIFAR-10 sCT (-1.0, 1.4).
- Conditional tangent ``dx_t/dt = cos t z - sin t x0``.
- ONE forward-mode pass through ``backbone_jvp`` at ``(x_t / sigma_d, t)`` with tangents
  ``(cos t sin t dx_t/dt / sigma_d, cos t sin t)`` ("JVP rearrangement": bounded as
  t -> pi/2) returns F and ``J = cos t sin t dF/dt``.  theta^- = stopgrad(theta) equals theta
  numerically, so ``F^-`` is the detached primal of that same pass and the grad-carrying
  ``F_theta`` is the primal itself: no second forward.  In FLOPs a step is one forward, one
  tangent pass and one backward, ~1.6x a flow-matching step instead of ~2.6x with a separate
  grad forward.  (On tiny CPU nets forward-AD dispatch overhead dominates instead: the 1-D
  toy MLP step measured ~4-5x a flow-matching step.)
- ``g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d J)``, which is
  ``cos t df/dt`` along the conditional path at r = 1; ``r = min(1, step / H)`` is the
  tangent warmup.  ``rcm_warmup`` uses NVlabs/rcm's form, ``-cos t sqrt(1 - r^2 sin^2 t)
  (sigma_d F^- - dx_t/dt)`` for the first term (equal at r = 1).  docs/methods.md words this as
  "multiplied by" the root; rcm's code replaces one cos t factor, which we follow.
- Tangent normalisation ``g <- g / (||g|| + c)``, c = 0.1, computed in float64 (rCM).
  ``tangent_norm=l2`` (default): the paper's and rCM's plain norm over all non-batch dims.
  ``rms``: sCM-mnist's ``||g|| sqrt(numel(norm) / numel(g)) = ||g|| / sqrt(D)``,
  resolution-invariant.  The two coincide for 1-D data.
- Loss ``mean_b[ e^{-u(t)} w(t) (1/D) ||F_theta - F^- - g||^2 + u(t) ]`` with a learned
  log-variance head ``u`` owned by this module (Fourier features of t -> Linear, zero-init)
  and ``w = 1`` or the paper's prior weight ``1 / (sigma_d tan t)`` (off by default:
  sCM-mnist found it destabilising).  Its theta-gradient is ``-(2/D) e^{-u} w grad F . g``.

Embedded defaults that differ from the paper: tangent warmup H = 1000 (paper 10k, for
runs of 100k+ steps; one sCM-mnist version uses 1000 on MNIST) so the warmup ends inside the
few-thousand-step toy budget; set ``method.tangent_warmup_steps=10000`` at paper scale.

Sampling (no guidance: sCT is trained unguided; labels still condition the net):
1 step ``x = f(sigma_d eps, T)``, T = ``t_max`` = pi/2 (rCM; sCM-mnist arctan(80/0.5));
2 steps re-noise to ``t_mid`` = 1.1 with ``eps' = fresh_noise(0)`` and apply f again.
Only nfe = 1, 2 are defined (the paper's settings).  Without ``fresh_noise`` (ad-hoc calls,
never the harness) eps' comes from a fixed-seed local generator: repeatable and leaves the
global RNG alone, but then depends on the batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from methods.base import Batch, Method, NoiseFn, broadcast_time, drop_labels, fallback_noise
from methods.jvp import backbone_jvp
from methods.specs.scm import SCMConfig, SCMSpec

PARAMETERIZATIONS = ("trigflow", "fm")
TANGENT_NORMS = ("l2", "rms", "none")


# ----------------------------------------------------------------------------------------
# TrigFlow time and the network's F


def sample_time(cfg: SCMConfig, n: int, generator: torch.Generator, device, dtype=torch.float32) -> Tensor:
    """TrigFlow training times t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2):
    shape (n,), values in (0, pi/2), pi/2 = noise."""
    tau = cfg.time_mean + cfg.time_std * torch.randn(n, generator=generator, device=device, dtype=dtype)
    return torch.atan(torch.exp(tau) / cfg.sigma_d)


def _fm_view(x_in: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(z_s, s, sin t + cos t) of the FM<->TrigFlow map; x_in = x_t / sigma_d (B, *shape)."""
    sc = torch.sin(t) + torch.cos(t)
    return x_in / broadcast_time(sc, x_in), torch.sin(t) / sc, sc


def trigflow_F(net: nn.Module, x_t: Tensor, t: Tensor, y: Tensor, cfg: SCMConfig) -> Tensor:
    """F_theta(x_t / sigma_d, t, y), shape of x_t (B, *shape); t (B,) TrigFlow, pi/2 = noise."""
    x_in = x_t / cfg.sigma_d
    if cfg.parameterization == "trigflow":
        return net(x_in, {"t": t}, y)
    z_s, s, sc = _fm_view(x_in, t)
    v = net(z_s, {"t": s}, y)
    return broadcast_time(torch.cos(t) - torch.sin(t), z_s) * z_s + v / broadcast_time(sc, v)


def trigflow_F_jvp(
    net: nn.Module, x_t: Tensor, t: Tensor, y: Tensor, dxt_dt: Tensor, cfg: SCMConfig
) -> tuple[Tensor, Tensor]:
    """One forward-mode pass: (F, J) with F = F_theta(x_t / sigma_d, t, y) keeping autograd and
    J = cos t sin t dF/dt (detached) along the path with velocity dx_t/dt (B, *shape).
    The tangents are pre-multiplied by cos t sin t (JVP rearrangement, bounded at pi/2)."""
    x_in, a = x_t / cfg.sigma_d, torch.cos(t) * torch.sin(t)
    dx_in = broadcast_time(a, x_t) * dxt_dt / cfg.sigma_d
    if cfg.parameterization == "trigflow":
        return backbone_jvp(net, x_in, {"t": t}, y, dx_in, {"t": a})
    # FM backbone: chain rule through the (analytic) input and output maps around one JVP
    z_s, s, sc = _fm_view(x_in, t)
    b = lambda u: broadcast_time(u, x_in)  # noqa: E731
    cmins = torch.cos(t) - torch.sin(t)
    dz_s = dx_in / b(sc) - x_in * b(cmins * a / sc**2)
    v, dv = backbone_jvp(net, z_s, {"t": s}, y, dz_s, {"t": a / sc**2})
    F = b(cmins) * z_s + v / b(sc)
    dF = -b(sc * a) * z_s + b(cmins) * dz_s + dv / b(sc) - v.detach() * b(cmins * a / sc**2)
    return F, dF.detach()


def consistency_fn(net: nn.Module, x_t: Tensor, t: Tensor, y: Tensor, cfg: SCMConfig) -> Tensor:
    """f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta: the predicted data end (B, *shape).
    f(x, 0) = x exactly."""
    F = trigflow_F(net, x_t, t, y, cfg)
    return broadcast_time(torch.cos(t), x_t) * x_t - broadcast_time(torch.sin(t), x_t) * cfg.sigma_d * F


# ----------------------------------------------------------------------------------------
# The sCT target


def warmup_ratio(step: int, warmup_steps: int) -> float:
    """Tangent warmup r = min(1, step / H); r = 1 when H <= 0."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def tangent_target(
    F_minus: Tensor, J: Tensor, x_t: Tensor, dxt_dt: Tensor, t: Tensor, *,
    r: float, sigma_d: float, rcm_warmup: bool = False,
) -> Tensor:
    """Unnormalised sCT tangent (B, *shape):
    g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d J),
    J = cos t sin t dF^-/dt.  At r = 1, g = cos t df^-/dt along the conditional path, whose
    mean given x_t is 0 when F^- is the exact consistency F*.  ``rcm_warmup`` replaces
    cos^2 t by cos t sqrt(1 - r^2 sin^2 t) (NVlabs/rcm)."""
    cos, sin = broadcast_time(torch.cos(t), x_t), broadcast_time(torch.sin(t), x_t)
    first = cos * torch.sqrt(1 - r**2 * sin**2) if rcm_warmup else cos**2
    return -first * (sigma_d * F_minus - dxt_dt) - r * (cos * sin * x_t + sigma_d * J)


def normalize_tangent(g: Tensor, mode: str, c: float) -> Tensor:
    """g / (||g|| + c) per sample, norm over all non-batch dims in float64 (rCM).
    ``rms`` divides the norm by sqrt(D) (sCM-mnist); ``none`` returns g."""
    if mode == "none":
        return g
    norm = g.double().flatten(1).norm(dim=1)
    if mode == "rms":
        norm = norm / math.sqrt(g[0].numel())
    return (g.double() / broadcast_time(norm + c, g)).to(g.dtype)


# ----------------------------------------------------------------------------------------
# Adaptive weighting


class LogVarianceHead(nn.Module):
    """u_phi(t): fixed Fourier features of TrigFlow t (frequencies 0.5 .. 16 per radian) ->
    Linear -> scalar, (B,) -> (B,).  Zero-initialised, so training starts at weight 1."""

    def __init__(self, features: int = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.logspace(math.log10(0.5), math.log10(16.0), features), persistent=False)
        self.linear = nn.Linear(2 * features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        args = t[:, None].to(self.linear.weight.dtype) * self.freqs.to(self.linear.weight.dtype)
        return self.linear(torch.cat([torch.cos(args), torch.sin(args)], dim=-1)).squeeze(-1)


# ----------------------------------------------------------------------------------------
# The method


class SCM(Method):
    spec = SCMSpec()

    def __init__(self, cfg: SCMConfig, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        if cfg.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"method.parameterization='{cfg.parameterization}' is unknown; "
                             f"expected one of {', '.join(PARAMETERIZATIONS)}")
        if cfg.tangent_norm not in TANGENT_NORMS:
            raise ValueError(f"method.tangent_norm='{cfg.tangent_norm}' is unknown; "
                             f"expected one of {', '.join(TANGENT_NORMS)}")
        self.log_variance = LogVarianceHead() if cfg.adaptive_weight else None

    def loss(
        self, net: nn.Module, batch: Batch, *, step: int, generator: torch.Generator,
        teacher: nn.Module | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        cfg, x0 = self.cfg, batch.x
        t = sample_time(cfg, x0.shape[0], generator, x0.device, x0.dtype)
        z = cfg.sigma_d * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        cos, sin = broadcast_time(torch.cos(t), x0), broadcast_time(torch.sin(t), x0)
        x_t, dxt_dt = cos * x0 + sin * z, cos * z - sin * x0
        y = drop_labels(batch.y, cfg.label_dropout, self.null_label, generator)
        F, J = trigflow_F_jvp(net, x_t, t, y, dxt_dt, cfg)
        F_minus = F.detach()  # theta^- = stopgrad(theta): same numbers, no second forward
        r = warmup_ratio(step, cfg.tangent_warmup_steps)
        g = tangent_target(F_minus, J, x_t, dxt_dt, t, r=r, sigma_d=cfg.sigma_d, rcm_warmup=cfg.rcm_warmup)
        if cfg.nan_mask:
            F, F_minus, g = _mask_non_finite(F, F_minus, g)
        g_norm = g.detach().flatten(1).norm(dim=1).mean()
        g = normalize_tangent(g, cfg.tangent_norm, cfg.tangent_norm_const)
        mse = (F - F_minus - g).pow(2).flatten(1).mean(dim=1)
        if cfg.prior_weight:
            mse = mse / (cfg.sigma_d * torch.tan(t))
        u = self.log_variance(t) if self.log_variance is not None else torch.zeros_like(mse)
        loss = (torch.exp(-u) * mse + u).mean()
        # one device sync for all logs
        values = torch.stack([v.detach().float() for v in (loss, mse.mean(), g_norm, u.mean())]).tolist()
        logs = dict(zip(("loss", "mse", "g_norm", "logvar"), values, strict=True)) | {"warmup": r}
        return loss, logs

    @torch.no_grad()
    def sample(
        self, net: nn.Module, noise: Tensor, labels: Tensor, *, nfe: int,
        guidance: float = 1.0, fresh_noise: NoiseFn | None = None,
        t_max: float | None = None, t_mid: float | None = None, **eval_params: Any,
    ) -> Tensor:
        """Noise eps (B, *shape) ~ N(0, I) at TrigFlow t_max (noise end) -> data, nfe in {1, 2}."""
        self.spec.validate(self.cfg, nfe, guidance)
        t_max = self.cfg.t_max if t_max is None else t_max
        t_mid = self.cfg.t_mid if t_mid is None else t_mid
        at = lambda value: torch.full((noise.shape[0],), value, device=noise.device, dtype=noise.dtype)  # noqa: E731
        x = consistency_fn(net, self.cfg.sigma_d * noise, at(t_max), labels, self.cfg)
        if nfe == 2:
            eps = fresh_noise(0) if fresh_noise is not None else fallback_noise(noise, 0x5C3)
            x_mid = math.cos(t_mid) * x + math.sin(t_mid) * self.cfg.sigma_d * eps
            x = consistency_fn(net, x_mid, at(t_mid), labels, self.cfg)
        return x


def _mask_non_finite(F: Tensor, F_minus: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """rCM: samples whose F or g has a non-finite entry contribute exactly zero."""
    bad = ~(torch.isfinite(F_minus).flatten(1).all(1) & torch.isfinite(g).flatten(1).all(1))
    bad = broadcast_time(bad, F).expand_as(F)
    zero = torch.zeros((), dtype=F.dtype, device=F.device)
    return torch.where(bad, zero, F), torch.where(bad, zero, F_minus), torch.where(bad, zero, g)
