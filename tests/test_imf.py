"""Specification of improved MeanFlow (methods/imf.py), checked against the closed-form fields
of Gaussian data (docs/methods.md §5, §7).  Convention: t = 1 is noise, z_t = (1 - t) x + t eps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from benchmark.backbones.mlp import MLPBackbone
from methods.base import Batch
from methods.imf import (
    ImprovedMeanFlow,
    compound_velocity,
    imf_condition,
    sample_interval,
    sample_omega,
)
from methods.jvp import backbone_jvp
from methods.meanflow import meanflow_target
from methods.meanflow_family import adaptive_weighted_loss
from methods.specs.base import InvalidPoint
from methods.specs.imf import ImprovedMeanFlowConfig
from tests import closed_form
from tests.test_meanflow import (
    MU,
    AnalyticAverageVelocity,
    CountingNet,
    S,
    gaussian_pairs,
    null_labels,
    one_and_two_step_moments,
    random_mlp,
    train_on_gaussian,
    z_scores,
)

F64 = torch.float64
SLOTS = ("h", "omega", "t_min", "t_max")


def conditions(t: Tensor, r: Tensor, time_input: bool = True) -> dict[str, Tensor]:
    """iMF conditioning at omega = 1 and interval [0, 1] (the unguided case), with the t slot
    by default because the analytic u needs t."""
    ones = torch.ones_like(t)
    return imf_condition(t, r, ones, 0 * ones, ones, time_input)


# ----------------------------------------------------------------------------------------
# (a) The estimator, no training: analytic u, and analytic v as the tangent v_c


def test_compound_velocity_equals_v_exactly_for_the_analytic_fields() -> None:
    # MeanFlow identity: V = u + (t - r)(d_t u + v d_z u) = v(z, t) when u and v_c are exact
    x, eps, z, t, r = gaussian_pairs(2_000, ratio_r_neq_t=1.0)
    v = closed_form.velocity(z, t[:, None], MU, S)
    V, _ = compound_velocity(AnalyticAverageVelocity(), z, conditions(t, r), null_labels(z), v, t - r)
    assert (V - v).abs().max().item() < 1e-9


def test_compound_velocity_minus_sample_velocity_has_mean_zero() -> None:
    # E[V - (eps - x) | z, t, r] = v - v = 0; 400k float64 samples, default 50% r != t;
    # observed |score| < 1
    x, eps, z, t, r = gaussian_pairs(400_000, ratio_r_neq_t=0.5)
    v = closed_form.velocity(z, t[:, None], MU, S)
    V, _ = compound_velocity(AnalyticAverageVelocity(), z, conditions(t, r), null_labels(z), v, t - r)
    plain, weighted = z_scores(V - (eps - x), z)
    assert abs(plain) < 4 and abs(weighted) < 4


def test_control_tangent_on_r_instead_of_t_gives_a_large_residual() -> None:
    # tangents (v_c, 0, 1) on (z, t, r), i.e. t: 0, h: -1; observed -114 SE
    x, eps, z, t, r = gaussian_pairs(400_000, ratio_r_neq_t=0.5)
    v = closed_form.velocity(z, t[:, None], MU, S)
    V, _ = compound_velocity(AnalyticAverageVelocity(), z, conditions(t, r), null_labels(z), v, t - r,
                             tangents={"t": 0.0, "h": -1.0})
    plain, weighted = z_scores(V - (eps - x), z)
    assert max(abs(plain), abs(weighted)) > 20


# ----------------------------------------------------------------------------------------
# (b) The JVP through a real backbone, and the §5 equivalence with MeanFlow's loss


def random_inputs(n: int = 6, dim: int = 3):
    gen = torch.Generator().manual_seed(2)
    z, v_c, v_g = (torch.randn(n, dim, generator=gen, dtype=F64) for _ in range(3))
    t = 0.5 + 0.5 * torch.rand(n, generator=gen, dtype=F64)
    r = t - 0.4 * torch.rand(n, generator=gen, dtype=F64) - 0.05
    omega = 1 + 7 * torch.rand(n, generator=gen, dtype=F64)
    t_min = 0.5 * torch.rand(n, generator=gen, dtype=F64)
    t_max = 0.5 + 0.5 * torch.rand(n, generator=gen, dtype=F64)
    y = torch.randint(0, 5, (n,), generator=gen)
    return z, v_c, v_g, t, r, imf_condition(t, r, omega, t_min, t_max, False), y


@pytest.mark.parametrize("aux_depth", [0, 1])
def test_jvp_equals_central_differences_along_v_c_and_h(monkeypatch, aux_depth: int) -> None:
    net = random_mlp(SLOTS, aux_depth=aux_depth)
    z, v_c, _, t, r, cond, y = random_inputs()
    V, v_aux = compound_velocity(net, z, cond, y, v_c, t - r, aux=bool(aux_depth))
    u = net(z, cond, y, return_aux=True)[0] if aux_depth else net(z, cond, y)
    dudt = (V - u) / (t - r)[:, None]

    def u_at(e: float) -> Tensor:  # no t input: t moves only through h; z moves along v_c
        out = net(z + e * v_c, {**cond, "h": cond["h"] + e}, y, return_aux=bool(aux_depth))
        return out[0] if aux_depth else out

    e = 1e-5
    central = (u_at(e) - u_at(-e)) / (2 * e)
    assert ((dudt - central).norm() / central.norm()).item() < 1e-7
    assert V.requires_grad
    if aux_depth:  # the aux output comes from the same pass, with its graph
        torch.testing.assert_close(v_aux, net(z, cond, y, return_aux=True)[1])
        assert v_aux.requires_grad


def test_imf_loss_equals_meanflow_loss_with_the_same_tangent_in_value_and_gradient(monkeypatch) -> None:
    # §5: ||V - v_g||^2 = ||u - (v_g - (t - r) du/dt)||^2, gradients through u only in both
    net = random_mlp(SLOTS)
    z, v_c, v_g, t, r, cond, y = random_inputs()
    V, _ = compound_velocity(net, z, cond, y, v_c, t - r)
    imf_loss, imf_dist = adaptive_weighted_loss(V - v_g, p=1.0, c=0.01)
    imf_grads = torch.autograd.grad(imf_loss, list(net.parameters()))
    u, dudt = backbone_jvp(net, z, cond, y, v_c, {"h": 1.0})
    mf_loss, mf_dist = adaptive_weighted_loss(u - meanflow_target(v_g, t, r, dudt), p=1.0, c=0.01)
    mf_grads = torch.autograd.grad(mf_loss, list(net.parameters()))
    torch.testing.assert_close(imf_dist, mf_dist, rtol=1e-12, atol=1e-12)
    for a, b in zip(imf_grads, mf_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Guided target, omega and interval sampling


class OmegaLabelVelocity(nn.Module):
    """A v-net that reveals its inputs: 10 + y (null label 3: -5) + 100 * omega slot; the aux
    head adds 1000, so a test can tell which head answered."""

    def forward(self, x: Tensor, cond: dict[str, Tensor], y: Tensor, return_aux: bool = False):
        assert (cond["h"] == 0).all() and (cond["t_min"] == 0).all() and (cond["t_max"] == 1).all()
        value = torch.where(y == 3, torch.full_like(y, -5), 10 + y).to(x.dtype) + 100 * cond["omega"]
        out = value[:, None].expand_as(x)
        return (out, out + 1000) if return_aux else out


def guided_case(**cfg_fields):
    """(v_c, v_g, calls, expected pieces) at t = [.2, .5, .8, .5], intervals [.3, .7] x 3 and
    [0, 1], omega = [2, 4, 8, 2]: the first and third t lie outside their interval."""
    t = torch.tensor([0.2, 0.5, 0.8, 0.5])
    t_min, t_max = torch.tensor([0.3, 0.3, 0.3, 0.0]), torch.tensor([0.7, 0.7, 0.7, 1.0])
    omega, y, v = torch.tensor([2.0, 4.0, 8.0, 2.0]), torch.tensor([0, 1, 2, 0]), torch.randn(4, 1)
    net = CountingNet(OmegaLabelVelocity())
    method = ImprovedMeanFlow(ImprovedMeanFlowConfig(**cfg_fields), num_classes=3)
    v_g, v_c = method.guided_field(net, torch.zeros(4, 1), t, v, y, omega=omega, t_min=t_min, t_max=t_max)
    omega_t = torch.tensor([1.0, 4.0, 1.0, 2.0])  # 1 outside the interval
    return v_c, v_g, net, v, y[:, None], (1 - 1 / omega_t)[:, None]


def test_guided_field_uses_omega_inside_the_interval_and_one_outside() -> None:
    v_c, v_g, net, v, y, w_in = guided_case()
    torch.testing.assert_close(v_c, 10.0 + y + 100 * w_in)  # v_c at omega' (1 outside)
    v_u = -5.0  # official: unconditional v at omega = 1 (slot value 0)
    torch.testing.assert_close(v_g, v + w_in * (v_c - v_u))
    assert v_g[0] == v[0] and v_g[2] == v[2]  # outside the interval: eps - x
    assert (net.calls, net.rows) == (1, 8)  # v_c and v_u in one doubled batch


def test_paper_algorithm_option_feeds_omega_to_the_unconditional_call() -> None:
    v_c, v_g, _, v, y, w_in = guided_case(uncond_omega="omega")
    torch.testing.assert_close(v_g, v + w_in * (v_c - (-5.0 + 100 * w_in)))


def test_aux_v_head_answers_the_v_calls_when_chosen() -> None:
    v_c, _, _, _, y, w_in = guided_case(v_head="aux", aux_depth=1)
    torch.testing.assert_close(v_c, 1010.0 + y + 100 * w_in)


def test_dropped_samples_get_the_null_label_and_eps_minus_x() -> None:
    method = ImprovedMeanFlow(ImprovedMeanFlowConfig(label_dropout=0.3), num_classes=3)
    n = 200
    t, omega = torch.full((n,), 0.5), torch.full((n,), 4.0)
    y, v = torch.arange(n) % 3, torch.randn(n, 1)
    v_g, y_in, v_c = method.training_field(
        OmegaLabelVelocity(), torch.zeros(n, 1), t, v, y, torch.Generator().manual_seed(0),
        omega=omega, t_min=torch.zeros(n), t_max=torch.ones(n))
    dropped = (y_in == 3)[:, None]
    assert 30 < dropped.sum() < 90 and dropped[: int(dropped.sum())].all()
    guided = v + 0.75 * (10.0 + y[:, None] + 75.0 - (-5.0))
    torch.testing.assert_close(v_g, torch.where(dropped, v, guided))
    torch.testing.assert_close(v_c, 10.0 + y[:, None] + 75.0)  # original labels, as official


def test_omega_is_log_uniform_on_one_to_eight() -> None:
    omega = sample_omega(100_000, 8.0, 1.0, torch.Generator().manual_seed(0), "cpu")
    assert omega.min() >= 1 and omega.max() <= 8
    u = torch.log(omega) / math.log(8.0)  # U(0, 1): mean 1/2, sd 1/sqrt(12)/sqrt(n)
    assert abs(u.mean().item() - 0.5) < 4 * (1 / math.sqrt(12)) / math.sqrt(100_000)


def test_omega_power_law_matches_its_cdf_for_beta_two() -> None:
    # density ~ omega^-2 on [1, 8]: F(w) = (1 - 1/w) / (1 - 1/8), median 1 / (1 - 0.4375)
    omega = sample_omega(100_000, 8.0, 2.0, torch.Generator().manual_seed(0), "cpu")
    assert abs(omega.median().item() - 1 / (1 - 0.4375)) < 0.02


def test_interval_is_split_at_one_half_and_full_where_r_equals_t() -> None:
    equal = torch.arange(1000) < 500
    t_min, t_max = sample_interval(1000, 0.5, equal, torch.Generator().manual_seed(0), "cpu")
    assert (t_min[:500] == 0).all() and (t_max[:500] == 1).all()
    assert (t_min[500:] <= 0.5).all() and (t_max[500:] >= 0.5).all() and t_min[500:].max() > 0.45


def test_training_step_costs_a_doubled_no_grad_pass_plus_one_jvp_pass() -> None:
    for classes, v_head, rows in ((3, "boundary", 3), (3, "aux", 3), (0, "boundary", 2)):
        cfg = ImprovedMeanFlowConfig(v_head=v_head, aux_depth=1)
        method = ImprovedMeanFlow(cfg, num_classes=classes)
        opts = {k: v for k, v in method.backbone_options().items() if k != "conditioning_mode"}
        net = CountingNet(MLPBackbone(shape=(1,), num_classes=classes, slots=method.conditioning,
                                      width=16, depth=2, **opts))
        y = torch.randint(0, classes, (32,)) if classes else torch.zeros(32, dtype=torch.long)
        gen = torch.Generator().manual_seed(0)
        loss, logs = method.loss(net, Batch(torch.randn(32, 1), y), step=0, generator=gen)
        loss.backward()
        assert net.rows / 32 == rows and net.calls == 2 and torch.isfinite(loss)
        assert ("loss_v" in logs) == (v_head == "aux")
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------
# (c) Tiny-MLP training on 1-D N(1.3, 0.4^2)


@pytest.mark.slow
def test_one_and_two_step_samples_match_the_data_after_tiny_training() -> None:
    # 1-D z does not reveal its noise level, so the toy net gets t (time_input); without it
    # 1-NFE samples had mean 0.92.  p = 0 for toys (§10); time_std 1.6 (py-meanflow's CIFAR
    # value) puts more pairs near r = 0, t = 1.  1500 steps at batch 256 leave the std
    # 0.02-0.04 low over seeds (0.40 by 3000 steps), hence 0.05.
    # Observed (seed 0): 1 NFE mean 1.285 std 0.374, 2 NFE mean 1.287 std 0.379.
    cfg = ImprovedMeanFlowConfig(adaptive_p=0.0, time_input=True, time_std=1.6)
    method = ImprovedMeanFlow(cfg, num_classes=0)
    stats = one_and_two_step_moments(method, train_on_gaussian(method, steps=1500, batch=256))
    for nfe in (1, 2):
        mean, std, to_flow_map, slope = stats[nfe]
        assert abs(mean - MU) < 0.05 and abs(std - S) < 0.05, (nfe, mean, std)
        assert to_flow_map < 0.05  # each sample lands near MU + S eps: noise -> data
        assert abs(slope - S) < 0.05, (nfe, slope)  # the map is increasing with slope S


# ----------------------------------------------------------------------------------------
# (d) The sampler contract


class RecordingNet(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x: Tensor, cond: dict[str, Tensor], y: Tensor, return_aux: bool = False):
        self.seen.append({k: v.clone() for k, v in cond.items()})
        return self.net(x, cond, y)


def small_method_and_net(**cfg_fields) -> tuple[ImprovedMeanFlow, CountingNet]:
    torch.manual_seed(0)
    method = ImprovedMeanFlow(ImprovedMeanFlowConfig(**cfg_fields), num_classes=3)
    net = MLPBackbone(shape=(2,), num_classes=3, slots=method.conditioning, width=16, depth=2)
    with torch.no_grad():  # FiLM starts at zero; move it so omega and h matter
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    return method, CountingNet(net)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("nfe", [1, 2, 3, 5])
def test_counted_passes_equal_nfe_cost_at_any_guidance(nfe: int, guidance: float) -> None:
    method, net = small_method_and_net()
    out = method.sample(net, torch.randn(5, 2), torch.tensor([0, 1, 2, 3, 0]), nfe=nfe,
                        guidance=guidance, interval_min=0.4, interval_max=0.65)
    assert out.shape == (5, 2)
    assert net.rows / 5 == method.spec.nfe_cost(method.cfg, nfe, guidance) == nfe


def test_guidance_one_is_the_unguided_path_whatever_the_interval() -> None:
    method, net = small_method_and_net()
    noise, labels = torch.randn(4, 2), torch.tensor([0, 1, 2, 3])
    z = noise
    for t, r in ((1.0, 0.5), (0.5, 0.0)):
        tt, rr = torch.full((4,), t), torch.full((4,), r)
        unguided = {"h": tt - rr, "omega": 0 * tt, "t_min": 0 * tt, "t_max": 1 + 0 * tt}
        z = z - (t - r) * net(z, unguided, labels)
    torch.testing.assert_close(method.sample(net, noise, labels, nfe=2, guidance=1.0), z)
    narrowed = method.sample(net, noise, labels, nfe=2, guidance=1.0,
                             interval_min=0.3, interval_max=0.6)
    assert torch.equal(narrowed, method.sample(net, noise, labels, nfe=2))
    guided = method.sample(net, noise, labels, nfe=2, guidance=4.0)
    assert (guided - z).abs().max() > 1e-3  # omega is an input the net responds to


def test_sampler_feeds_one_minus_inverse_omega_the_interval_and_h() -> None:
    method, counted = small_method_and_net()
    net = RecordingNet(counted.net)
    method.sample(net, torch.randn(3, 2), torch.tensor([0, 1, 2]), nfe=4, guidance=4.0,
                  interval_min=0.4, interval_max=0.65)
    assert len(net.seen) == 4 and set(net.seen[0]) == set(SLOTS)  # no t: noise-conditioning-free
    for cond in net.seen:
        torch.testing.assert_close(cond["omega"], torch.full((3,), 0.75))
        torch.testing.assert_close(cond["h"], torch.full((3,), 0.25))
        assert (cond["t_min"] == 0.4).all() and (cond["t_max"] == 0.65).all()


def test_same_noise_gives_same_samples_without_touching_the_global_rng() -> None:
    method, net = small_method_and_net()
    noise, labels = torch.randn(4, 2), torch.tensor([0, 1, 2, 3])
    state = torch.random.get_rng_state()
    first = method.sample(net, noise, labels, nfe=2, guidance=3.0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(method.sample(net, noise, labels, nfe=2, guidance=3.0), first)


@pytest.mark.parametrize("nfe", [0, -2, 1.5])
def test_non_positive_or_fractional_nfe_is_rejected_naming_the_allowed_values(nfe) -> None:
    method, net = small_method_and_net()
    with pytest.raises(InvalidPoint, match="expected nfe >= 1"):
        method.sample(net, torch.randn(2, 2), torch.zeros(2, dtype=torch.long), nfe=nfe)


def test_an_inverted_or_out_of_range_interval_is_rejected() -> None:
    method, net = small_method_and_net()
    for lo, hi in ((0.7, 0.4), (-0.1, 0.5), (0.2, 1.5)):
        with pytest.raises(InvalidPoint, match="interval_min <= method.interval_max"):
            method.spec.validate(ImprovedMeanFlowConfig(interval_min=lo, interval_max=hi), 1, 2.0)
        with pytest.raises(InvalidPoint):
            method.sample(net, torch.randn(2, 2), torch.zeros(2, dtype=torch.long), nfe=1,
                          guidance=2.0, interval_min=lo, interval_max=hi)


def test_spec_declares_input_guidance_eval_interval_and_backbone_options() -> None:
    spec, cfg = ImprovedMeanFlow.spec, ImprovedMeanFlowConfig()
    assert (spec.name, spec.guidance) == ("imf", "eval_input")
    assert spec.conditioning(cfg) == SLOTS
    assert spec.conditioning(ImprovedMeanFlowConfig(time_input=True)) == ("t", *SLOTS)
    assert ImprovedMeanFlowConfig.fields_on("eval") == ["interval_min", "interval_max"]
    assert spec.nfe_cost(cfg, 3, 8.0) == 3
    default = ImprovedMeanFlow(cfg, 3).backbone_options()
    assert default == {"aux_depth": 0}  # the conditioning mode is the model's, as for every method
    aux = ImprovedMeanFlow(ImprovedMeanFlowConfig(v_head="aux"), 3)
    assert aux.backbone_options() == {"aux_depth": 8}


@pytest.mark.parametrize("bad, message", [
    (dict(v_head="both"), "expected one of: boundary, aux"),
    (dict(uncond_omega="zero"), "expected one of: one, omega"),
    (dict(omega_max=0.5), "omega_max=0.5"),
    (dict(v_head="aux", aux_depth=0), "aux_depth=0"),
])
def test_bad_config_values_are_named_in_the_error(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImprovedMeanFlowConfig(**bad)


def test_embedded_omega_is_zero_without_guidance_and_below_one_always() -> None:
    cond = imf_condition(torch.ones(3), torch.zeros(3), torch.tensor([1.0, 2.0, 8.0]),
                         torch.zeros(3), torch.ones(3), False)
    torch.testing.assert_close(cond["omega"], torch.tensor([0.0, 0.5, 0.875]))
