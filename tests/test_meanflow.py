"""Specification of MeanFlow (methods/meanflow.py), checked against the closed-form fields of
Gaussian data (docs/methods.md §7).  Convention: t = 1 is noise, z_t = (1 - t) x + t eps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from benchmark.backbones.mlp import MLPBackbone
from methods.base import Batch, Method, broadcast_time, sample_logit_normal
from methods.meanflow import MeanFlow, average_velocity_and_target
from methods.meanflow_family import adaptive_weighted_loss, drop_labels_ordered, sample_time_pair
from methods.specs.base import InvalidPoint
from methods.specs.meanflow import MeanFlowConfig
from tests import closed_form

MU, S = 1.3, 0.4  # the 1-D Gaussian data of every test here
F64 = torch.float64

# ----------------------------------------------------------------------------------------
# Helpers (also used by tests/test_imf.py)


class AnalyticAverageVelocity(nn.Module):
    """The exact u(z, r, t) of N(MU, S^2) data behind the backbone signature; reads slots t
    and h (r = t - h) and ignores any other slot and the label.  The aux output is the
    exact instantaneous velocity v(z, t)."""

    def forward(
        self, x: Tensor, cond: dict[str, Tensor], y: Tensor, return_aux: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        t = broadcast_time(cond["t"], x)
        u = closed_form.average_velocity(x, t - broadcast_time(cond["h"], x), t, MU, S)
        return (u, closed_form.velocity(x, t, MU, S)) if return_aux else u


class CountingNet(nn.Module):
    """Counts backbone rows: passes per sample = rows / batch size (the harness's way)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.rows, self.calls = net, 0, 0

    def forward(self, x: Tensor, cond: dict[str, Tensor], y: Tensor, return_aux: bool = False):
        self.rows, self.calls = self.rows + x.shape[0], self.calls + 1
        return self.net(x, cond, y, return_aux=return_aux) if return_aux else self.net(x, cond, y)


def random_mlp(slots: tuple[str, ...], *, dim: int = 3, aux_depth: int = 0) -> MLPBackbone:
    """A float64 MLP whose zero-initialised FiLM layers are moved off zero."""
    torch.manual_seed(0)
    net = MLPBackbone(shape=(dim,), num_classes=4, slots=slots, width=32, depth=3,
                      cond_dim=16, aux_depth=aux_depth).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=F64))
    return net


def gaussian_pairs(n: int, ratio_r_neq_t: float, seed: int = 0):
    """(x, eps, z, t, r) in float64 for MC checks: x ~ N(MU, S^2), (t, r) from the method's
    sampler with MeanFlow's defaults, x/eps/z (n, 1), t/r (n,)."""
    gen = torch.Generator().manual_seed(seed)
    t, r = sample_time_pair(n, mean=-0.4, std=1.0, ratio_r_neq_t=ratio_r_neq_t,
                            selection="first", generator=gen, device="cpu")
    t, r = t.to(F64), r.to(F64)
    x = MU + S * torch.randn(n, 1, generator=gen, dtype=F64)
    eps = torch.randn(n, 1, generator=gen, dtype=F64)
    return x, eps, (1 - t[:, None]) * x + t[:, None] * eps, t, r


def null_labels(x: Tensor) -> Tensor:
    """(B,) null labels for unconditional data (num_classes = 0)."""
    return torch.zeros(x.shape[0], dtype=torch.long)


def z_scores(residual: Tensor, z: Tensor) -> tuple[float, float]:
    """Monte-Carlo means of residual and residual * z, each in standard errors.  Both are 0
    in expectation when E[residual | z, t, r] = 0."""
    scores = []
    for q in (residual, residual * z):
        scores.append((q.mean() / (q.std() / math.sqrt(q.numel()))).item())
    return scores[0], scores[1]


def train_on_gaussian(method: Method, *, steps: int, batch: int, width: int = 64,
                      seed: int = 0) -> MLPBackbone:
    """Adam 3e-3 with cosine decay (docs/methods.md §10) on unconditional 1-D N(MU, S^2)."""
    torch.manual_seed(seed)
    opts = {k: v for k, v in method.backbone_options().items() if k != "conditioning_mode"}
    net = MLPBackbone(shape=(1,), num_classes=0, slots=method.conditioning, width=width,
                      depth=3, cond_dim=64, **opts)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    null = torch.zeros(batch, dtype=torch.long)
    for step in range(steps):
        x = MU + S * torch.randn(batch, 1, generator=gen)
        loss, _ = method.loss(net, Batch(x, null), step=step, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return net


def one_and_two_step_moments(method: Method, net: nn.Module, n: int = 20_000) -> dict:
    """Sample statistics per NFE from seeded noise: mean, std, the mean distance to the
    exact 1-D flow map MU + S eps (the monotone quantile map), and the least-squares slope
    of the samples on their noise (S for that map; 0 for a sampler that ignores its noise)."""
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(123))
    labels = torch.zeros(n, dtype=torch.long)
    stats = {}
    for nfe in (1, 2):
        x = method.sample(net, noise, labels, nfe=nfe)
        slope = ((x - x.mean()) * (noise - noise.mean())).mean() / noise.var()
        stats[nfe] = (x.mean().item(), x.std().item(), (x - (MU + S * noise)).abs().mean().item(),
                      slope.item())
    return stats


# ----------------------------------------------------------------------------------------
# (a) The estimator, no training: the analytic u plugged into the target


def test_target_equals_u_exactly_when_the_tangent_is_the_true_velocity() -> None:
    # MeanFlow identity u = v - (t - r)(d_t u + v d_z u): with v_g = v(z, t) the target is u
    x, eps, z, t, r = gaussian_pairs(2_000, ratio_r_neq_t=1.0)
    v = closed_form.velocity(z, t[:, None], MU, S)
    u, u_tgt = average_velocity_and_target(AnalyticAverageVelocity(), z, t, r, null_labels(z), v)
    assert (u - u_tgt).abs().max().item() < 1e-9


def test_target_is_unbiased_with_the_sample_velocity_eps_minus_x() -> None:
    # E[u_tgt | z, t, r] = u, because u_tgt is affine in v_g and E[eps - x | z] = v(z, t);
    # 400k float64 samples from the default sampler (25% r != t); observed |score| < 1
    x, eps, z, t, r = gaussian_pairs(400_000, ratio_r_neq_t=0.25)
    u, u_tgt = average_velocity_and_target(AnalyticAverageVelocity(), z, t, r, null_labels(z), eps - x)
    plain, weighted = z_scores(u - u_tgt, z)
    assert abs(plain) < 4 and abs(weighted) < 4


def test_control_tangent_on_r_instead_of_t_gives_a_biased_target() -> None:
    # the classic slip: tangents (v, 0, 1) on (z, t, r), i.e. t: 0, h: -1; observed -61 SE
    x, eps, z, t, r = gaussian_pairs(400_000, ratio_r_neq_t=0.25)
    wrong = {"t": 0.0, "h": -1.0}
    u, u_tgt = average_velocity_and_target(
        AnalyticAverageVelocity(), z, t, r, null_labels(z), eps - x, wrong
    )
    plain, weighted = z_scores(u - u_tgt, z)
    assert max(abs(plain), abs(weighted)) > 20


# ----------------------------------------------------------------------------------------
# (b) The JVP through a real backbone


def test_jvp_equals_central_differences_of_u_along_the_training_path(monkeypatch) -> None:
    net = random_mlp(("t", "h"))
    gen = torch.Generator().manual_seed(2)
    z, v_g = (torch.randn(6, 3, generator=gen, dtype=F64) for _ in range(2))
    t = 0.5 + 0.5 * torch.rand(6, generator=gen, dtype=F64)
    r = t - 0.4 * torch.rand(6, generator=gen, dtype=F64) - 0.05
    y = torch.randint(0, 5, (6,), generator=gen)
    u, u_tgt = average_velocity_and_target(net, z, t, r, y, v_g)
    dudt = (v_g - u_tgt) / (t - r)[:, None]

    def u_at(e: float) -> Tensor:  # u(z + e v_g, t + e, r): d/dt at fixed r along dz/dt = v_g
        return net(z + e * v_g, {"t": t + e, "h": t + e - r}, y)

    e = 1e-5
    central = (u_at(e) - u_at(-e)) / (2 * e)
    assert ((dudt - central).norm() / central.norm()).item() < 1e-7
    torch.testing.assert_close(u, net(z, {"t": t, "h": t - r}, y))
    assert u.requires_grad and not u_tgt.requires_grad


def test_loss_is_one_jvp_pass_plus_only_the_guidance_passes_it_needs() -> None:
    # rows per sample: JVP 1; + unconditional 1 when kappa = 0; + doubled 2 when kappa > 0
    batch = Batch(MU + S * torch.randn(32, 1), torch.randint(0, 3, (32,)))
    expected = {(1.0, 0.0): 1, (2.0, 0.0): 2, (1.0, 0.5): 3, (0.2, 0.92): 3}
    for (omega, kappa), rows in expected.items():
        method = MeanFlow(MeanFlowConfig(omega=omega, kappa=kappa), num_classes=3)
        net = CountingNet(MLPBackbone(shape=(1,), num_classes=3, slots=("t", "h"), width=16, depth=2))
        loss, _ = method.loss(net, batch, step=0, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert net.rows / 32 == rows and net.calls == (1 if rows == 1 else 2)
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------
# Guided target, label drop, samplers, weighting


class LabelVelocity(nn.Module):
    """v(z, t | y) = 10 + y for real labels, -5 for the null label 3 (num_classes = 3)."""

    def forward(
        self, x: Tensor, cond: dict[str, Tensor], y: Tensor, return_aux: bool = False
    ) -> Tensor:
        assert (cond["h"] == 0).all()  # guidance forwards are at the boundary h = 0
        value = torch.where(y == 3, torch.full_like(y, -5), 10 + y).to(x.dtype)
        return value[:, None].expand_as(x)


def test_guided_field_is_omega_v_plus_kappa_vc_plus_rest_vu_inside_the_interval_only() -> None:
    cfg = MeanFlowConfig(omega=2.0, kappa=0.5, cfg_t_start=0.3, cfg_t_end=0.7)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    y = torch.tensor([0, 1, 2, 0, 1])
    v = torch.arange(5.0)[:, None]
    net = CountingNet(LabelVelocity())
    v_g, _ = MeanFlow(cfg, num_classes=3).guided_field(net, torch.zeros(5, 1), t, v, y)
    v_c, v_u = 10.0 + y[:, None], -5.0
    guided = 2.0 * v + 0.5 * v_c + (1 - 2.0 - 0.5) * v_u
    inside = ((t >= 0.3) & (t <= 0.7))[:, None]
    torch.testing.assert_close(v_g, torch.where(inside, guided, v))
    assert (net.calls, net.rows) == (1, 10)  # conditional and unconditional in one batch


def test_guided_field_with_kappa_zero_needs_only_the_unconditional_pass() -> None:
    t, y, v = torch.full((4,), 0.5), torch.tensor([0, 1, 2, 0]), torch.ones(4, 1)
    net = CountingNet(LabelVelocity())
    method = MeanFlow(MeanFlowConfig(omega=3.0), num_classes=3)
    v_g, _ = method.guided_field(net, torch.zeros(4, 1), t, v, y)
    torch.testing.assert_close(v_g, 3.0 * v + (1 - 3.0) * -5.0)
    assert (net.calls, net.rows) == (1, 4)
    for cfg, classes in ((MeanFlowConfig(omega=3.0), 0), (MeanFlowConfig(), 3)):
        silent = CountingNet(LabelVelocity())
        assert MeanFlow(cfg, classes).guided_field(silent, torch.zeros(4, 1), t, v, y)[0] is v
        assert silent.calls == 0  # unconditional data or no guidance: no extra pass


def test_dropped_samples_get_the_null_label_and_the_unguided_field() -> None:
    cfg = MeanFlowConfig(omega=2.0, label_dropout=0.3)
    y, v = torch.arange(200) % 3, torch.randn(200, 1)
    v_g, y_in, _ = MeanFlow(cfg, num_classes=3).training_field(
        LabelVelocity(), torch.zeros(200, 1), torch.full((200,), 0.5), v, y,
        torch.Generator().manual_seed(0))
    dropped = (y_in == 3)[:, None]
    assert 30 < dropped.sum() < 90 and dropped[: int(dropped.sum())].all()  # a prefix
    torch.testing.assert_close(v_g, torch.where(dropped, v, 2.0 * v + (1 - 2.0) * -5.0))


def test_label_drop_first_drops_a_prefix_and_random_drops_anywhere() -> None:
    y = torch.arange(10_000) % 7
    first, hit = drop_labels_ordered(y, 0.1, 7, "first", torch.Generator().manual_seed(0))
    count = int(hit.sum())
    assert hit[:count].all() and not hit[count:].any() and (first[:count] == 7).all()
    assert abs(count - 1000) < 4 * math.sqrt(10_000 * 0.1 * 0.9)
    _, spread = drop_labels_ordered(y, 0.1, 7, "random", torch.Generator().manual_seed(0))
    assert spread[5000:].sum() > 400  # about half the drops land in the second half


def test_time_pairs_have_r_equal_t_on_the_first_block_and_r_below_t_after() -> None:
    t, r = sample_time_pair(1000, mean=-0.4, std=1.0, ratio_r_neq_t=0.25, selection="first",
                            generator=torch.Generator().manual_seed(0), device="cpu")
    assert (t[:750] == r[:750]).all() and (r[750:] < t[750:]).all()
    assert ((0 < r) & (t < 1)).all()


def test_clamp_pairing_keeps_the_law_of_t_and_draws_r_from_its_own() -> None:
    # py-meanflow v1: t ~ logit-normal(-0.6, 1.6), r ~ logit-normal(-4, 1.6), r = min(t, r)
    t, r = sample_time_pair(4000, mean=-0.6, std=1.6, ratio_r_neq_t=0.75, selection="random",
                            generator=torch.Generator().manual_seed(0), device="cpu",
                            r_mean=-4.0, r_std=1.6, pairing="clamp")
    t_alone = sample_logit_normal(4000, -0.6, 1.6, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(t, t_alone) and (r <= t).all()
    # r = t on the masked ~25% and where the r draw exceeds t (about 5% of the rest)
    assert 0.65 < (r < t).float().mean().item() < 0.77


def test_adaptive_weight_divides_the_summed_square_by_its_stopped_offset_power() -> None:
    residual = torch.tensor([[1.0, 2.0], [0.0, 3.0]], requires_grad=True)
    loss, dist = adaptive_weighted_loss(residual, p=1.0, c=0.01)
    torch.testing.assert_close(dist, torch.tensor([5.0, 9.0]))
    torch.testing.assert_close(loss, (5 / 5.01 + 9 / 9.01) / 2 * torch.ones(()))
    loss.backward()  # weight is stopped: d/dres = 2 res / (D + c) / B
    weight = torch.tensor([[5.01], [9.01]])
    torch.testing.assert_close(residual.grad, residual.detach() / weight)
    plain, _ = adaptive_weighted_loss(residual, p=0.0, c=0.01)
    torch.testing.assert_close(plain, torch.tensor(7.0))


def _location_efficiency(residual: Tensor, p: float, delta: float = 1e-3) -> tuple[float, float]:
    """(mean score / its standard error, efficiency) of the adaptive-weighted loss as an
    estimator of a location shift a along the first coordinate of ``residual`` (N, D):
    score psi_b = -d loss_b / da, efficiency = var(e) E[psi']^2 / var(psi) (1 = plain L2)."""
    def scores(shift: float) -> Tensor:
        res = residual.clone()
        res[:, 0] -= shift
        res.requires_grad_(True)
        loss, _ = adaptive_weighted_loss(res, p=p, c=0.01)
        (grad,) = torch.autograd.grad(loss * len(res), res)
        return grad[:, 0] / 2
    psi = scores(0.0)
    slope = (scores(-delta).mean() - scores(delta).mean()) / (2 * delta)
    eff = residual[:, 0].var() * slope**2 / psi.var()
    return (psi.mean() / (psi.std() / math.sqrt(len(psi)))).item(), eff.item()


def test_adaptive_weight_p1_is_unbiased_but_keeps_a_fifth_of_the_batch_on_1d_gaussians() -> None:
    # The residual of the exact field, (eps - x) - v(z, t), is Gaussian and symmetric for
    # N(MU, S^2) data, so p = 1 keeps the exact field as its fixed point; but in 1-D its
    # weight 1 / (e^2 + c) makes it a redescending M-estimator whose gradient is as noisy
    # as a plain-L2 batch 0.19x as large at t = 0.5 (closed form by quadrature: 0.191;
    # 0.14-0.32 over t).  Summed over 64 dims (digits) the weight is nearly constant.
    # Measured: z-score -1.4, efficiency 0.190 (1-D); 1.000 (p = 0); 0.966 (64-D).
    g = torch.Generator().manual_seed(0)
    n, t = 200_000, torch.full((200_000, 1), 0.5, dtype=F64)
    x = MU + S * torch.randn(n, 1, generator=g, dtype=F64)
    eps = torch.randn(n, 1, generator=g, dtype=F64)
    z = (1 - t) * x + t * eps
    residual = (eps - x) - closed_form.velocity(z, t, MU, S)
    assert abs(residual.std().item() - 0.743) < 0.005  # the conditional std at t = 0.5
    z_score, eff = _location_efficiency(residual, p=1.0)
    assert abs(z_score) < 4 and 0.17 < eff < 0.21
    assert abs(_location_efficiency(residual, p=0.0)[1] - 1) < 1e-6
    wide = torch.randn(20_000, 64, generator=g, dtype=F64) * 0.743
    assert _location_efficiency(wide, p=1.0)[1] > 0.95


# ----------------------------------------------------------------------------------------
# (c) Tiny-MLP training on 1-D N(1.3, 0.4^2)


@pytest.mark.slow
def test_one_and_two_step_samples_match_the_data_after_tiny_training() -> None:
    # p = 0 for toys (§10); py-meanflow's v1 sampler (its CIFAR config) puts pairs near
    # r = 0, t = 1 where the 1-step map lives.  1500 steps at batch 256 are short: the
    # std comes out 0.01-0.03 low over seeds (it reaches 0.40 by 3000 steps), hence 0.05.
    # Observed (seed 0): 1 NFE mean 1.301 std 0.370, 2 NFE mean 1.310 std 0.383.
    cfg = MeanFlowConfig(adaptive_p=0.0, time_mean=-0.6, time_std=1.6, r_time_mean=-4.0,
                         r_time_std=1.6, tr_pairing="clamp", ratio_r_neq_t=0.75,
                         r_neq_t_selection="random")
    method = MeanFlow(cfg, num_classes=0)
    stats = one_and_two_step_moments(method, train_on_gaussian(method, steps=1500, batch=256))
    for nfe in (1, 2):
        mean, std, to_flow_map, slope = stats[nfe]
        assert abs(mean - MU) < 0.05 and abs(std - S) < 0.05, (nfe, mean, std)
        assert to_flow_map < 0.05  # each sample lands near MU + S eps: noise -> data
        assert abs(slope - S) < 0.05, (nfe, slope)  # the map is increasing with slope S


# ----------------------------------------------------------------------------------------
# (d) The sampler contract


def small_method_and_net(omega: float = 1.0) -> tuple[MeanFlow, CountingNet]:
    torch.manual_seed(0)
    net = MLPBackbone(shape=(2,), num_classes=3, slots=("t", "h"), width=16, depth=2)
    return MeanFlow(MeanFlowConfig(omega=omega), num_classes=3), CountingNet(net)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 8])
def test_counted_passes_equal_nfe_cost(nfe: int, guidance: float) -> None:
    method, net = small_method_and_net(omega=guidance)  # guidance is MF's training omega
    labels = torch.tensor([0, 1, 2, 3, 0])
    out = method.sample(net, torch.randn(5, 2), labels, nfe=nfe, guidance=guidance)
    assert out.shape == (5, 2)
    assert net.rows / 5 == method.spec.nfe_cost(method.cfg, nfe, guidance) == nfe


def test_sampling_is_the_euler_loop_of_u_on_the_uniform_grid_and_ignores_guidance() -> None:
    method, net = small_method_and_net()
    noise, labels = torch.randn(4, 2), torch.tensor([0, 1, 2, 3])
    z = noise
    for t, r in ((1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0)):
        tt, rr = torch.full((4,), t), torch.full((4,), r)
        z = z - (t - r) * net(z, {"t": tt, "h": tt - rr}, labels)
    torch.testing.assert_close(method.sample(net, noise, labels, nfe=3), z)
    unguided = method.sample(net, noise, labels, nfe=3, guidance=1.0)
    assert torch.equal(method.sample(net, noise, labels, nfe=3, guidance=4.0), unguided)


def test_same_noise_gives_same_samples_without_touching_the_global_rng() -> None:
    method, net = small_method_and_net()
    noise, labels = torch.randn(4, 2), torch.tensor([0, 1, 2, 3])
    state = torch.random.get_rng_state()
    first = method.sample(net, noise, labels, nfe=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(method.sample(net, noise, labels, nfe=2), first)


@pytest.mark.parametrize("nfe", [0, -1, 2.5])
def test_non_positive_or_fractional_nfe_is_rejected_naming_the_allowed_values(nfe) -> None:
    method, net = small_method_and_net()
    with pytest.raises(InvalidPoint, match="expected nfe >= 1"):
        method.spec.validate(method.cfg, nfe, 1.0)
    with pytest.raises(InvalidPoint):
        method.sample(net, torch.randn(2, 2), torch.zeros(2, dtype=torch.long), nfe=nfe)


def test_guidance_below_one_is_rejected() -> None:
    method, _ = small_method_and_net()
    with pytest.raises(InvalidPoint, match="guidance=0.5"):
        method.spec.validate(method.cfg, 1, 0.5)


def test_spec_declares_training_guidance_and_the_t_h_slots() -> None:
    spec = MeanFlow.spec
    assert (spec.name, spec.guidance, spec.guidance_field) == ("meanflow", "train", "omega")
    assert spec.conditioning(MeanFlowConfig()) == ("t", "h")
    assert MeanFlowConfig.axis_of("omega") == "train" and MeanFlowConfig.fields_on("eval") == []


@pytest.mark.parametrize("bad, message", [
    (dict(kappa=1.0), "kappa=1.0"),
    (dict(r_neq_t_selection="middle"), "expected one of: first, random"),
    (dict(tr_pairing="swap"), "expected one of: sort, clamp"),
    (dict(cfg_t_start=0.8, cfg_t_end=0.2), "cfg_t_start=0.8"),
    (dict(ratio_r_neq_t=1.5), "ratio_r_neq_t=1.5"),
])
def test_bad_config_values_are_named_in_the_error(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MeanFlowConfig(**bad)
