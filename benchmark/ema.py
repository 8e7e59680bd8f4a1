"""Post-hoc EMA: power-function EMA profiles tracked while training, reconstructed at any
relative width at evaluation (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", arXiv 2312.02696, §3 and Appendix C; written from the
paper's equations).

A power-function EMA at training step t averages the past weights theta_tau with density
proportional to tau^gamma on [0, t].  Its relative width is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))),

so sigma_rel 0.05 is gamma ~ 16.97 and 0.10 is gamma ~ 6.94.  It is tracked with one
update per optimizer step, ``ema <- beta ema + (1 - beta) theta`` with
``beta = (1 - 1/t)^(gamma + 1)`` after step t (t = 1, 2, ...).  The first update has
beta = 0, so the initial (random) weights carry no weight at all, whatever the run length;
a fixed decay keeps 0.999^3000 ~ 5% of them after 3000 steps.

Unrolled, the tracked average after T steps puts the weight

    w_T(tau) = (tau^(gamma+1) - (tau - 1)^(gamma+1)) / T^(gamma+1)         (tau = 1..T)

on theta_tau (the step-tau weights): exactly the continuous profile integrated over each
step.  Snapshots of a few tracked profiles at a few steps span a space of such weight
vectors; any other profile (another sigma_rel, ending at T) is approximated by the linear
combination of snapshots whose weight vector is closest in least squares, normalised to
sum 1.  The Gram matrix is computed from these exact per-step weights, so a profile that
was tracked, asked for at a snapshot step, is returned exactly (the solution is that
snapshot alone).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

SIGMA_REL_MAX = 0.28
"""sigma_rel approaches sqrt(1/12) = 0.2887 (a uniform average, gamma = 0) from below."""


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma of the power profile of relative width ``sigma_rel``: the largest
    real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel={sigma_rel} is outside (0, {SIGMA_REL_MAX})")
    inv = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def sigma_rel_from_gamma(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(gamma: float, step: int) -> float:
    """EMA coefficient of the update after training step ``step`` (1-based): (1 - 1/step)^(gamma+1)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_key(sigma_rel: float) -> str:
    """The name a tracked profile is stored under, e.g. ``"0.05"``."""
    return f"{sigma_rel:g}"


class PowerEMA:
    """Power-function EMA copies of a network's parameters, one per ``sigma_rels``.

    Buffers are copied from the network (they are not averaged; the shared backbones have
    none that change while training).  ``update(net, step)`` after optimizer step ``step``
    (1-based); ``state_dict()`` / ``load_state_dict()`` for checkpoints and snapshots."""

    def __init__(self, net: nn.Module, sigma_rels: Sequence[float]) -> None:
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(gamma_from_sigma_rel(s) for s in self.sigma_rels)
        self.profiles = {profile_key(s): {k: v.detach().clone() for k, v in net.state_dict().items()}
                         for s in self.sigma_rels}

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        current = dict(net.named_parameters())
        for sigma, gamma in zip(self.sigma_rels, self.gammas):
            profile, beta = self.profiles[profile_key(sigma)], power_beta(gamma, step)
            names = [n for n in current if n in profile]
            torch._foreach_lerp_([profile[n] for n in names], [current[n].detach() for n in names],
                                 1.0 - beta)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {k: {n: v.clone() for n, v in p.items()} for k, p in self.profiles.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        missing = set(self.profiles) - set(state)
        if missing:
            raise KeyError(f"EMA profile(s) {sorted(missing)} missing from the checkpoint")
        for key, profile in self.profiles.items():
            for name, value in profile.items():
                value.copy_(state[key][name])


# ----------------------------------------------------------------------------------------
# Reconstruction


def profile_weights(gamma: float, end: int, taus: np.ndarray) -> np.ndarray:
    """Per-step weights w_end(tau) of a profile tracked to step ``end``, at steps ``taus``
    (1-based; zero beyond ``end``), float64."""
    tau = np.minimum(taus, end).astype(np.float64)
    w = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / float(end) ** (gamma + 1)
    return np.where(taus <= end, w, 0.0)


def _gram(profiles: list[tuple[float, int]], chunk: int = 1 << 16) -> np.ndarray:
    """Inner products sum_tau w_i(tau) w_j(tau) of the (gamma, end) profiles, rows/cols in
    order; chunked over tau so memory stays bounded for long runs."""
    last = max(end for _, end in profiles)
    gram = np.zeros((len(profiles), len(profiles)))
    for lo in range(1, last + 1, chunk):
        taus = np.arange(lo, min(last, lo + chunk - 1) + 1)
        w = np.stack([profile_weights(g, e, taus) for g, e in profiles])
        gram += w @ w.T
    return gram


def reconstruction_coefficients(snapshots: list[tuple[float, int]], sigma_rel: float, end: int) -> np.ndarray:
    """Coefficients x (one per snapshot, sum 1) with sum_i x_i snapshot_i closest in least
    squares to the profile of ``sigma_rel`` tracked to step ``end``.

    ``snapshots``: (sigma_rel, step) of each stored snapshot; only those with step <= end
    may get weight (later ones hold weights the target never saw).  Solves A x = b with
    A_ij = <w_i, w_j>, b_i = <w_i, w_target> over per-step weights."""
    usable = [i for i, (_, step) in enumerate(snapshots) if step <= end]
    if not usable:
        raise ValueError(f"no EMA snapshot at or before step {end}")
    profiles = [(gamma_from_sigma_rel(snapshots[i][0]), snapshots[i][1]) for i in usable]
    gram = _gram([*profiles, (gamma_from_sigma_rel(sigma_rel), end)])
    a, b = gram[:-1, :-1], gram[:-1, -1]
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    x = x / x.sum()
    full = np.zeros(len(snapshots))
    full[usable] = x
    return full


def reconstruction_error(snapshots: list[tuple[float, int]], sigma_rel: float, end: int) -> float:
    """Relative L2 distance between the reconstructed and the exact per-step weights: how
    well the snapshots can express this profile (0 for a tracked one at a snapshot step)."""
    x = reconstruction_coefficients(snapshots, sigma_rel, end)
    taus = np.arange(1, end + 1)
    target = profile_weights(gamma_from_sigma_rel(sigma_rel), end, taus)
    approx = sum(xi * profile_weights(gamma_from_sigma_rel(s), step, taus)
                 for xi, (s, step) in zip(x, snapshots) if xi)
    return float(np.linalg.norm(approx - target) / np.linalg.norm(target))


def combine(states: Iterable[dict[str, torch.Tensor]], coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i c_i state_i for floating tensors (accumulated in float64, cast back); other
    tensors are taken from the last state."""
    out: dict[str, torch.Tensor] = {}
    acc: dict[str, torch.Tensor] = {}
    for state, c in zip(states, coefficients):
        for name, value in state.items():
            if value.is_floating_point():
                acc[name] = acc.get(name, 0) + float(c) * value.double()
            out[name] = value
    return {name: (acc[name].to(value.dtype) if name in acc else value) for name, value in out.items()}
