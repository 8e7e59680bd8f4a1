"""iCT: improved consistency training in discrete time (Song & Dhariwal, "Improved
Techniques for Training Consistency Models", arXiv 2310.14189).  docs/methods.md §12.

The paper's parametrisation, native to this module: EDM noise levels sigma, a noisy sample
``x_sigma = x + sigma eps`` (sigma in [sigma_min, sigma_max] = [0.002, 80], data at
sigma_min), and the consistency function

    f(x_sigma, sigma) = c_skip(sigma) x_sigma + c_out(sigma) F(c_in(sigma) x_sigma, sigma)
    c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2)
    c_out  = sigma_d (sigma - sigma_min) / sqrt(sigma_d^2 + sigma^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_d^2)

so ``f(x, sigma_min) = x`` exactly and f returns data.

Mapping to the suite's convention (t = 1 noise, t = 0 data, z_t = (1 - t) x + t eps): for
``t = sigma / (1 + sigma)``, ``z_t = x_sigma / (1 + sigma)``, i.e. ``x_sigma = z_t / (1 - t)``
and ``sigma = t / (1 - t)``; sigma = inf is the suite's t = 1.  The backbone's ``t`` slot
carries this suite time t, raw in (0, 1) (the paper's c_noise(sigma) = 0.25 ln sigma, scaled
by 1000 in its code, is another monotone map of the same level; the suite's backbones embed
times in [0, 1]).  The backbone's input is the paper's ``c_in x_sigma``, which equals
``z_t (1 + sigma) / sqrt(sigma^2 + sigma_d^2)``.  The suite's noise eps enters the 1-step
sampler as ``x_sigma_max = sigma_max eps`` (the paper's start, whose data term is dropped).

Training step (paper Algorithm, "iCT"), per batch at training step k of K:

- curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1 levels, K' = floor(K / (log2(s1/s0) + 1))
  (K = ``curriculum_steps``);
- Karras grid sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho;
- lognormal level sampling: i in 1..N-1 with probability proportional to
  erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2 P_std));
- one eps per sample shared by both levels; prediction f_theta(x + sigma_{i+1} eps, sigma_{i+1})
  with gradient, target f_theta^-(x + sigma_i eps, sigma_i) with theta^- = stopgrad(theta): the
  same online network without gradient (no EMA teacher: the paper's central change);
- loss mean_b lambda(sigma_i) d(f_theta, f_theta^-), lambda = 1 / (sigma_{i+1} - sigma_i),
  d the pseudo-Huber metric sqrt(||a - b||^2 + c^2) - c over all non-batch dims,
  c = 0.00054 sqrt(d) for d-dimensional data.

A step is a no-grad forward, a forward and a backward: about 4/3 of a Flow Matching step.

Sampling (paper's multistep consistency sampling): 1 step ``x = f(sigma_max eps, sigma_max)``;
2 steps re-noise ``x + sqrt(sigma_mid^2 - sigma_min^2) eps'`` with ``eps' = fresh_noise(0)``
and apply f at sigma_mid.  Only nfe = 1, 2 are defined.  No guidance: iCT is trained
unguided; labels condition the net.

Deviations from the paper: the backbone has no dropout (the paper uses 0.3 on CIFAR-10, and
the same dropout mask in the two forwards); the time slot carries t instead of
1000 * 0.25 ln sigma; the curriculum length K is a method field (``curriculum_steps``), set
it to ``train.steps``; the evaluation EMA is the suite's post-hoc one (docs/methods.md §11),
not the paper's fixed 0.99993.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from methods.base import Batch, Method, NoiseFn, broadcast_time, drop_labels, fallback_noise
from methods.specs.ict import ICTConfig, ICTSpec

# ----------------------------------------------------------------------------------------
# Noise levels and the suite's time


def suite_time(sigma: Tensor) -> Tensor:
    """t = sigma / (1 + sigma): the suite's time of EDM level sigma (t = 1 noise)."""
    return sigma / (1 + sigma)


def discretisation_steps(step: int, cfg: ICTConfig) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 grid levels at training step k."""
    k_prime = max(1, math.floor(cfg.curriculum_steps / (math.log2(cfg.s1 / cfg.s0) + 1)))
    return min(cfg.s0 * 2 ** (step // k_prime), cfg.s1) + 1


def karras_levels(n: int, cfg: ICTConfig, dtype: torch.dtype = torch.float64) -> Tensor:
    """The n increasing levels sigma_1 = sigma_min < ... < sigma_n = sigma_max, shape (n,)."""
    lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
    return (lo + torch.linspace(0, 1, n, dtype=dtype) * (hi - lo)) ** cfg.rho


def level_probabilities(levels: Tensor, p_mean: float, p_std: float) -> Tensor:
    """P(i) for the N - 1 pairs (sigma_i, sigma_{i+1}): the lognormal N(p_mean, p_std^2) mass
    of ln sigma between the two levels, normalised; shape (N - 1,)."""
    cdf = torch.erf((torch.log(levels) - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def sample_level_pairs(
    n: int, step: int, cfg: ICTConfig, generator: torch.Generator, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """(sigma_i, sigma_{i+1}), each (n,) float64 on ``device``, for training step ``step``."""
    levels = karras_levels(discretisation_steps(step, cfg), cfg)
    probs = level_probabilities(levels, cfg.p_mean, cfg.p_std).to(device)
    i = torch.multinomial(probs, n, replacement=True, generator=generator)
    levels = levels.to(device)
    return levels[i], levels[i + 1]


# ----------------------------------------------------------------------------------------
# The consistency function


def consistency_fn(net: nn.Module, x_sigma: Tensor, sigma: Tensor, y: Tensor, cfg: ICTConfig) -> Tensor:
    """f(x_sigma, sigma) = c_skip x_sigma + c_out F(c_in x_sigma, t); x_sigma (B, *shape),
    sigma (B,).  The backbone's t slot gets the suite time sigma / (1 + sigma)."""
    s = broadcast_time(sigma, x_sigma).to(x_sigma.dtype)
    sd, smin = cfg.sigma_data, cfg.sigma_min
    c_skip = sd**2 / ((s - smin) ** 2 + sd**2)
    c_out = sd * (s - smin) / torch.sqrt(sd**2 + s**2)
    c_in = 1 / torch.sqrt(s**2 + sd**2)
    F = net(c_in * x_sigma, {"t": suite_time(sigma).to(x_sigma.dtype)}, y)
    return c_skip * x_sigma + c_out * F


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    """sqrt(||diff||^2 + c^2) - c per sample, the norm over all non-batch dims; (B,)."""
    return torch.sqrt(diff.pow(2).flatten(1).sum(dim=1) + c**2) - c


def consistency_pair(
    net: nn.Module, x: Tensor, eps: Tensor, sigma_lo: Tensor, sigma_hi: Tensor, y: Tensor, cfg: ICTConfig
) -> tuple[Tensor, Tensor]:
    """(f_theta(x + sigma_hi eps, sigma_hi) with gradient, f_theta^-(x + sigma_lo eps, sigma_lo)
    without): the prediction and target of one CT pair, both (B, *shape), one eps for both."""
    hi, lo = broadcast_time(sigma_hi, x).to(x.dtype), broadcast_time(sigma_lo, x).to(x.dtype)
    prediction = consistency_fn(net, x + hi * eps, sigma_hi, y, cfg)
    with torch.no_grad():
        target = consistency_fn(net, x + lo * eps, sigma_lo, y, cfg)
    return prediction, target


class ImprovedConsistencyTraining(Method):
    spec = ICTSpec()
    cfg: ICTConfig

    def loss(
        self, net: nn.Module, batch: Batch, *, step: int, generator: torch.Generator,
        teacher: nn.Module | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """mean_b lambda(sigma_i) pseudo-Huber(f_theta - f_theta^-) for a batch x (B, *shape);
        logs the loss, the curriculum's N and the mean squared CT gap per element."""
        cfg, x = self.cfg, batch.x
        sigma_lo, sigma_hi = sample_level_pairs(x.shape[0], step, cfg, generator, x.device)
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        y = drop_labels(batch.y, cfg.label_dropout, self.null_label, generator)
        prediction, target = consistency_pair(net, x, eps, sigma_lo, sigma_hi, y, cfg)
        c = cfg.huber_c if cfg.huber_c is not None else 0.00054 * math.sqrt(x[0].numel())
        weight = (1 / (sigma_hi - sigma_lo)).to(x.dtype)
        diff = prediction - target
        loss = (weight * pseudo_huber(diff, c)).mean()
        return loss, {"loss": loss.item(), "levels": float(discretisation_steps(step, cfg)),
                      "gap": diff.detach().pow(2).mean().item()}

    @torch.no_grad()
    def sample(
        self, net: nn.Module, noise: Tensor, labels: Tensor, *, nfe: int,
        guidance: float = 1.0, fresh_noise: NoiseFn | None = None,
        sigma_mid: float | None = None, **eval_params: Any,
    ) -> Tensor:
        """Noise eps (B, *shape) ~ N(0, I) -> data in nfe in {1, 2} consistency steps."""
        cfg = self.cfg
        mid = cfg.sigma_mid if sigma_mid is None else sigma_mid
        self.spec.validate(replace(cfg, sigma_mid=mid), nfe, guidance)
        at = lambda s: torch.full((noise.shape[0],), s, dtype=noise.dtype, device=noise.device)  # noqa: E731
        x = consistency_fn(net, cfg.sigma_max * noise, at(cfg.sigma_max), labels, cfg)
        if nfe == 2:
            eps = fresh_noise(0) if fresh_noise is not None else fallback_noise(noise, 0x1C7)
            x_mid = x + math.sqrt(mid**2 - cfg.sigma_min**2) * eps
            x = consistency_fn(net, x_mid, at(mid), labels, cfg)
        return x
