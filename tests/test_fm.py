"""Flow Matching against closed forms (docs/methods.md §1, §7)."""

from __future__ import annotations

import torch
from torch import nn

from methods.base import Batch
from methods.fm import FlowMatching
from methods.specs.fm import FlowMatchingConfig
from tests.closed_form import velocity

MU, S = 1.3, 0.4


class AnalyticVelocity(nn.Module):
    """The exact marginal velocity of N(MU, S^2) data; labels ignored."""

    def forward(self, x, cond, y, return_aux=False):
        return velocity(x, cond["t"].reshape(-1, *([1] * (x.dim() - 1))), MU, S)


def euler_moments(nfe: int, n: int = 20000) -> tuple[float, float]:
    fm = FlowMatching(FlowMatchingConfig(), num_classes=0)
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = fm.sample(AnalyticVelocity(), noise, torch.zeros(n, dtype=torch.long), nfe=nfe)
    return x.mean().item(), x.std().item()


def test_euler_with_the_exact_velocity_reaches_the_target_distribution_as_steps_grow() -> None:
    errors = []
    for nfe in (1, 4, 16, 64):
        mean, std = euler_moments(nfe)
        errors.append(abs(std - S) + abs(mean - MU))
    # 1 step returns E[x | z_1] (a point mass at MU): std 0, far from S
    assert errors[0] > 0.3
    assert errors == sorted(errors, reverse=True)
    # Euler is first order: 64 steps leave a small, shrinking bias; MC error ~ 0.003
    assert errors[-1] < 0.02


def test_one_euler_step_returns_the_posterior_mean() -> None:
    mean, std = euler_moments(1)
    assert abs(mean - MU) < 0.01 and std < 1e-6


def test_heun_is_more_accurate_than_euler_at_equal_steps() -> None:
    fm = FlowMatching(FlowMatchingConfig(), num_classes=0)
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(20000, dtype=torch.long)
    euler = fm.sample(AnalyticVelocity(), noise, y, nfe=8, solver="euler")
    heun = fm.sample(AnalyticVelocity(), noise, y, nfe=8, solver="heun")
    assert abs(heun.std().item() - S) < abs(euler.std().item() - S)


def test_loss_residual_has_zero_mean_with_the_exact_velocity() -> None:
    """E[v(z_t, t) - (eps - x) | z_t] = 0: the FM regression target is unbiased."""
    fm = FlowMatching(FlowMatchingConfig(label_dropout=0.0), num_classes=0)
    n = 200_000
    gen = torch.Generator().manual_seed(1)
    x = MU + S * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    batch = Batch(x, torch.zeros(n, dtype=torch.long))
    seen = {}

    class Probe(nn.Module):
        """The exact velocity, recording the z_t and t the loss fed it."""

        def forward(self, z, cond, y, return_aux=False):
            t = cond["t"].reshape(-1, 1).to(z.dtype)
            seen["z"], seen["t"] = z, t
            return velocity(z, t, MU, S)

    fm.loss(Probe(), batch, step=0, generator=gen)
    z, t = seen["z"], seen["t"]
    # z_t = (1 - t) x + t eps, so the regression target eps - x is (z_t - x) / t
    residual = velocity(z, t, MU, S) - (z - x) / t
    for q in (residual, residual * z):  # E[q] = 0 when E[residual | z_t] = 0; 200k samples
        score = (q.mean() / (q.std() / n**0.5)).item()
        assert abs(score) < 4, score  # 4 standard errors; observed |score| < 1
    # the loss is ||v - (eps - x)||^2, whose minimiser is the marginal velocity: the
    # expected loss equals the conditional variance, smaller than with a biased field
    loss_exact = fm.loss(AnalyticVelocity(), batch, step=0, generator=torch.Generator().manual_seed(2))[0]

    class Biased(AnalyticVelocity):
        def forward(self, x, cond, y, return_aux=False):
            return super().forward(x, cond, y) + 0.1

    loss_biased = fm.loss(Biased(), batch, step=0, generator=torch.Generator().manual_seed(2))[0]
    assert torch.isclose(loss_biased - loss_exact, torch.tensor(0.01, dtype=torch.float64), rtol=0.05)
