"""Specification of iCT (methods/ict.py), checked against the closed-form consistency function
of Gaussian data (docs/methods.md §7, §12).  Paper levels: x_sigma = x + sigma eps; the
suite's time t = sigma / (1 + sigma), z_t = x_sigma / (1 + sigma)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from methods.base import Batch
from methods.ict import (
    ImprovedConsistencyTraining,
    consistency_fn,
    consistency_pair,
    discretisation_steps,
    karras_levels,
    level_probabilities,
    pseudo_huber,
    sample_level_pairs,
)
from methods.specs.base import InvalidPoint
from methods.specs.ict import ICTConfig
from tests import closed_form

MU, S = 1.3, 0.4
F64 = torch.float64
CFG = ICTConfig()


def exact_f(x_sigma: Tensor, sigma: Tensor) -> Tensor:
    """The exact consistency function of N(MU, S^2) data: the PF-ODE map from sigma to
    sigma_min, MU + sqrt(S^2 + sigma_min^2) / sqrt(S^2 + sigma^2) (x_sigma - MU)."""
    return MU + math.sqrt(S**2 + CFG.sigma_min**2) / torch.sqrt(S**2 + sigma**2) * (x_sigma - MU)


class AnalyticF(nn.Module):
    """The F whose consistency function is exact_f: reads the suite time t from its slot,
    recovers sigma = t / (1 - t) and x_sigma = input / c_in, and inverts c_skip, c_out."""

    def forward(self, x_in: Tensor, cond: dict[str, Tensor], y: Tensor, return_aux: bool = False) -> Tensor:
        t = cond["t"].reshape(-1, *([1] * (x_in.dim() - 1)))
        sigma, sd, smin = t / (1 - t), CFG.sigma_data, CFG.sigma_min
        x_sigma = x_in * torch.sqrt(sigma**2 + sd**2)
        c_skip = sd**2 / ((sigma - smin) ** 2 + sd**2)
        c_out = sd * (sigma - smin) / torch.sqrt(sd**2 + sigma**2)
        return (exact_f(x_sigma, sigma) - c_skip * x_sigma) / c_out


def null(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.long)


# ----------------------------------------------------------------------------------------
# The consistency function and its mapping to the suite's time


def test_boundary_condition_f_of_x_at_sigma_min_is_x_for_any_network() -> None:
    torch.manual_seed(0)
    net = nn.Linear(1, 1).double()
    x = torch.randn(64, 1, dtype=F64)
    out = consistency_fn(lambda z, cond, y: net(z), x, torch.full((64,), CFG.sigma_min, dtype=F64), null(64), CFG)
    assert torch.equal(out, x)


def test_exact_f_through_the_parametrisation_is_the_suite_flow_map_to_sigma_min() -> None:
    # x_sigma = z_t / (1 - t) with t = sigma / (1 + sigma): the suite's exact ODE map from t
    # to t_min, rescaled, must equal f computed from the paper's c_skip/c_out/c_in and the
    # t slot the module feeds
    gen = torch.Generator().manual_seed(0)
    sigma = torch.exp(torch.empty(500, dtype=F64).uniform_(math.log(0.01), math.log(80), generator=gen))
    x_sigma = MU + torch.sqrt(S**2 + sigma**2)[:, None] * torch.randn(500, 1, generator=gen, dtype=F64)
    f = consistency_fn(AnalyticF(), x_sigma, sigma, null(500), CFG)
    t, t_min = sigma / (1 + sigma), CFG.sigma_min / (1 + CFG.sigma_min)
    z_t = x_sigma * (1 - t)[:, None]
    suite = closed_form.flow_map(z_t, t[:, None], torch.tensor(t_min, dtype=F64), MU, S) / (1 - t_min)
    assert (f - suite).abs().max().item() < 1e-9


# ----------------------------------------------------------------------------------------
# The training pair


def ct_coefficient(sigma_lo: float, sigma_hi: float) -> float:
    """E[f*(x + sigma_hi eps) - f*(x + sigma_lo eps) | x_hi] = -A (x_hi - MU), with
    E[x_lo | x_hi] = MU + (S^2 + sigma_lo sigma_hi) / (S^2 + sigma_hi^2) (x_hi - MU); returns -A.
    A is second order in sigma_hi - sigma_lo: the CT target's bias vanishes as N grows."""
    k = math.sqrt(S**2 + CFG.sigma_min**2)
    lo, hi = sigma_lo, sigma_hi
    a = k * ((S**2 + lo * hi) / ((S**2 + hi**2) * math.sqrt(S**2 + lo**2)) - 1 / math.sqrt(S**2 + hi**2))
    return -a


@pytest.mark.parametrize("sigma_lo, sigma_hi", [(0.3, 0.5), (1.0, 2.5)])
def test_ct_pair_with_the_exact_f_has_the_closed_form_second_order_bias(sigma_lo: float, sigma_hi: float) -> None:
    # one eps shared by the two levels; regression of (prediction - target) on x_hi - MU over
    # 400k float64 samples against the closed-form coefficient, within 4 standard errors
    n = 400_000
    gen = torch.Generator().manual_seed(1)
    x = MU + S * torch.randn(n, 1, generator=gen, dtype=F64)
    eps = torch.randn(n, 1, generator=gen, dtype=F64)
    lo, hi = torch.full((n,), sigma_lo, dtype=F64), torch.full((n,), sigma_hi, dtype=F64)
    prediction, target = consistency_pair(AnalyticF(), x, eps, lo, hi, null(n), CFG)
    u = (x + sigma_hi * eps - MU).flatten()
    res = (prediction - target).flatten()
    slope = (res * u).sum() / (u * u).sum()
    se = (res - slope * u).std() / ((u * u).sum().sqrt())
    expected = ct_coefficient(sigma_lo, sigma_hi)
    assert abs(slope.item() - expected) < 4 * se.item(), (slope.item(), expected, se.item())
    assert abs(expected) > 8 * se.item()  # the bias is resolved, not zero by accident
    assert prediction.requires_grad is False and not target.requires_grad  # analytic net: no params


def test_control_independent_noise_at_the_two_levels_gives_a_far_larger_bias() -> None:
    # the classic slip: a fresh eps for the target level; observed slope 0.31 vs 0.020 (SE 0.001)
    n = 400_000
    gen = torch.Generator().manual_seed(1)
    x = MU + S * torch.randn(n, 1, generator=gen, dtype=F64)
    eps, other = (torch.randn(n, 1, generator=gen, dtype=F64) for _ in range(2))
    lo, hi = torch.full((n,), 0.3, dtype=F64), torch.full((n,), 0.5, dtype=F64)
    prediction = consistency_fn(AnalyticF(), x + 0.5 * eps, hi, null(n), CFG)
    target = consistency_fn(AnalyticF(), x + 0.3 * other, lo, null(n), CFG)
    u = (x + 0.5 * eps - MU).flatten()
    slope = ((prediction - target).flatten() * u).sum() / (u * u).sum()
    assert slope.item() > 10 * ct_coefficient(0.3, 0.5)


def test_prediction_carries_the_gradient_and_the_target_is_the_same_net_stopped() -> None:
    torch.manual_seed(0)
    from benchmark.backbones.mlp import MLPBackbone

    net = MLPBackbone(shape=(2,), num_classes=0, slots=("t",), width=16, depth=2).double()
    x, eps = torch.randn(8, 2, dtype=F64), torch.randn(8, 2, dtype=F64)
    lo, hi = torch.full((8,), 0.5, dtype=F64), torch.full((8,), 0.7, dtype=F64)
    prediction, target = consistency_pair(net, x, eps, lo, hi, null(8), CFG)
    assert prediction.requires_grad and not target.requires_grad
    torch.testing.assert_close(target, consistency_fn(net, x + 0.5 * eps, lo, null(8), CFG))  # no EMA teacher


def test_curriculum_doubles_from_s0_to_s1_over_the_training_steps() -> None:
    # K = 3000, K' = floor(3000 / (log2(128) + 1)) = 375: N = 11, 21, ... up to 1281
    cfg = ICTConfig(curriculum_steps=3000)
    assert [discretisation_steps(k, cfg) for k in (0, 374, 375, 750, 2624, 2625, 2999)] == [
        11, 11, 21, 41, 641, 1281, 1281]


def test_levels_are_the_karras_grid_and_pairs_follow_the_lognormal_masses() -> None:
    levels = karras_levels(11, CFG)
    assert levels[0].item() == pytest.approx(0.002) and levels[-1].item() == pytest.approx(80.0)
    assert (levels[1:] > levels[:-1]).all()
    probs = level_probabilities(levels, -1.1, 2.0)
    cdf = lambda s: 0.5 * (1 + math.erf((math.log(s) - -1.1) / (2.0 * math.sqrt(2))))  # noqa: E731
    for i in (0, 4, 9):
        mass = cdf(levels[i + 1].item()) - cdf(levels[i].item())
        total = cdf(80.0) - cdf(0.002)
        assert probs[i].item() == pytest.approx(mass / total, rel=1e-9)
    n = 200_000
    lo, hi = sample_level_pairs(n, 0, CFG, torch.Generator().manual_seed(0), "cpu")
    index = torch.searchsorted(levels, lo)
    assert torch.equal(hi, levels[index + 1])  # adjacent levels
    freq = torch.bincount(index, minlength=10).double() / n
    se = torch.sqrt(probs * (1 - probs) / n)
    assert ((freq - probs).abs() <= 5 * se + 1e-12).all()  # 5 binomial standard errors


def test_pseudo_huber_is_the_offset_norm_and_the_loss_weights_by_the_level_gap() -> None:
    diff = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(pseudo_huber(diff, 1.0), torch.tensor([math.sqrt(26) - 1, 0.0]))
    # a net returning the input x_sigma scale makes both f's known: check the loss assembly
    method = ImprovedConsistencyTraining(ICTConfig(s0=1, s1=1), num_classes=0)  # N = 2: one pair
    x = torch.randn(16, 3, dtype=F64)
    loss, logs = method.loss(lambda z, cond, y: z, Batch(x, null(16)), step=0,
                             generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    lo, hi = sample_level_pairs(16, 0, method.cfg, gen, "cpu")
    eps = torch.randn(x.shape, generator=gen, dtype=F64)
    prediction, target = consistency_pair(lambda z, cond, y: z, x, eps, lo, hi, null(16), method.cfg)
    expected = (pseudo_huber(prediction - target, 0.00054 * math.sqrt(3)) / (hi - lo)).mean()
    torch.testing.assert_close(loss, expected)
    assert logs["levels"] == 2.0


# ----------------------------------------------------------------------------------------
# Samplers against closed forms


def test_one_step_sample_with_the_exact_f_is_the_closed_form_map_of_sigma_max_eps() -> None:
    method = ImprovedConsistencyTraining(CFG, num_classes=0)
    noise = torch.randn(1000, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = method.sample(AnalyticF(), noise, null(1000), nfe=1)
    torch.testing.assert_close(x, exact_f(80.0 * noise, torch.tensor(80.0, dtype=F64)), rtol=0, atol=1e-9)


def test_two_step_sample_renoises_to_sigma_mid_with_the_fresh_noise() -> None:
    method = ImprovedConsistencyTraining(CFG, num_classes=0)
    gen = torch.Generator().manual_seed(0)
    noise, extra = (torch.randn(1000, 1, generator=gen, dtype=F64) for _ in range(2))
    x = method.sample(AnalyticF(), noise, null(1000), nfe=2, fresh_noise=lambda i: extra)
    first = exact_f(80.0 * noise, torch.tensor(80.0, dtype=F64))
    mid = torch.tensor(0.821, dtype=F64)
    expected = exact_f(first + torch.sqrt(mid**2 - 0.002**2) * extra, mid)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-9)


def test_only_one_or_two_steps_without_guidance_and_a_sigma_mid_inside_the_range() -> None:
    method = ImprovedConsistencyTraining(CFG, num_classes=0)
    noise = torch.randn(4, 1)
    with pytest.raises(InvalidPoint, match="allowed: nfe=1,2"):
        method.sample(AnalyticF(), noise, null(4), nfe=3)
    with pytest.raises(InvalidPoint, match="guidance"):
        method.sample(AnalyticF(), noise, null(4), nfe=1, guidance=2.0)
    with pytest.raises(InvalidPoint, match="sigma_mid=100"):
        method.sample(AnalyticF(), noise, null(4), nfe=2, sigma_mid=100.0)


@pytest.mark.parametrize("bad, message", [
    (dict(sigma_min=0.0), "sigma_min=0.0"),
    (dict(s0=20, s1=10), "s0=20"),
    (dict(curriculum_steps=0), "curriculum_steps=0"),
    (dict(huber_c=-1.0), "huber_c=-1.0"),
])
def test_bad_config_values_are_named_in_the_error(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ICTConfig(**bad)
