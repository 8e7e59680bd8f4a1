"""Post-hoc EMA: power-function profiles, their exact per-step weights, reconstruction from
snapshots, and the harness path from snapshots to the evaluated weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmark.config import compose_points
from benchmark.ema import (
    PowerEMA,
    gamma_from_sigma_rel,
    profile_key,
    profile_weights,
    reconstruction_coefficients,
    sigma_rel_from_gamma,
)
from benchmark.plan import plan_points
from benchmark.store import Store
from benchmark.train import evaluation_net, load_trained, train


class Vector(nn.Module):
    """A 'network' whose only parameter is a vector we set by hand each step."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(n, dtype=torch.float64))


def track(trajectory: np.ndarray, sigma_rels, snapshot_every: int | None = None):
    """Run PowerEMA over theta_1..theta_T (rows of ``trajectory``; theta_0 = the init, a
    row of 1e6); returns the final profiles and the snapshots {(sigma, step): vector}."""
    net = Vector(trajectory.shape[1])
    with torch.no_grad():
        net.theta.fill_(1e6)  # the random init: must carry no weight at all
    ema = PowerEMA(net, sigma_rels)
    snapshots = {}
    for step, row in enumerate(trajectory, start=1):
        with torch.no_grad():
            net.theta.copy_(torch.from_numpy(row))
        ema.update(net, step)
        if snapshot_every and step % snapshot_every == 0:
            for s in sigma_rels:
                snapshots[(s, step)] = ema.profiles[profile_key(s)]["theta"].clone().numpy()
    return {s: ema.profiles[profile_key(s)]["theta"].numpy() for s in sigma_rels}, snapshots


def test_gamma_and_sigma_rel_are_inverse_and_match_the_papers_examples() -> None:
    assert gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
    assert gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.02, 0.07, 0.15, 0.25):
        assert sigma_rel_from_gamma(gamma_from_sigma_rel(s)) == pytest.approx(s, rel=1e-10)


def test_a_tracked_profile_puts_exactly_the_closed_form_weight_on_each_step_and_none_on_the_init() -> None:
    """Feed one-hot weights (theta_tau = e_tau): the EMA vector *is* the weight each step
    gets.  It equals (tau^(g+1) - (tau-1)^(g+1)) / T^(g+1) to float64 precision, sums to
    1, and the init (1e6 everywhere) contributes nothing; a fixed decay 0.999 would keep
    0.999^T of it."""
    steps = 3000
    profiles, _ = track(np.eye(steps), (0.05, 0.10))
    for s, weights in profiles.items():
        exact = profile_weights(gamma_from_sigma_rel(s), steps, np.arange(1, steps + 1))
        assert np.max(np.abs(weights - exact)) < 1e-14
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)  # nothing left for the init
        mean = (weights * np.arange(1, steps + 1)).sum()
        std = math.sqrt((weights * (np.arange(1, steps + 1) - mean) ** 2).sum())
        assert std / steps == pytest.approx(s, rel=0.01)  # its relative width is sigma_rel
    assert 0.999 ** steps > 0.04  # what a fixed decay keeps of the init after 3000 steps


def test_a_tracked_width_asked_for_at_a_snapshot_step_is_that_snapshot_exactly() -> None:
    snapshots = [(s, k) for k in range(250, 3001, 250) for s in (0.05, 0.10)]
    for target in (0.05, 0.10):
        for end in (1500, 3000):
            x = reconstruction_coefficients(snapshots, target, end)
            expected = np.array([1.0 if pair == (target, end) else 0.0 for pair in snapshots])
            assert np.max(np.abs(x - expected)) < 1e-8


def _smooth_trajectory(steps: int) -> np.ndarray:
    tau = np.arange(1, steps + 1)[:, None] / steps
    return np.hstack([np.sin(6 * tau), tau ** 2, np.exp(-3 * tau), np.cos(11 * tau) * tau])


@pytest.mark.parametrize("target", [0.07, 0.15])
def test_reconstruction_matches_a_directly_tracked_profile_and_improves_with_denser_snapshots(target) -> None:
    """Other widths are least-squares combinations: on a smooth weight trajectory the
    reconstruction is within 1% (relative, max over coordinates) of a profile tracked
    directly at that width, and twelve snapshots do better than three."""
    steps = 3000
    trajectory = _smooth_trajectory(steps)
    direct = track(trajectory, (target,))[0][target]
    errors = []
    for every in (1000, 250):
        final, snaps = track(trajectory, (0.05, 0.10), snapshot_every=every)
        keys = list(snaps)
        x = reconstruction_coefficients(keys, target, steps)
        approx = sum(c * snaps[k] for c, k in zip(x, keys))
        errors.append(np.max(np.abs(approx - direct)) / np.max(np.abs(direct)))
    assert errors[1] < 0.01
    assert errors[1] < errors[0]


def test_snapshots_after_the_end_get_no_weight() -> None:
    snapshots = [(s, k) for k in (100, 200, 300) for s in (0.05, 0.10)]
    x = reconstruction_coefficients(snapshots, 0.08, 200)
    assert all(c == 0 for c, (_, k) in zip(x, snapshots) if k > 200)
    assert sum(x) == pytest.approx(1.0)


def test_training_writes_snapshots_and_evaluation_rebuilds_the_tracked_profile_exactly(
        toy_overrides, tmp_path: Path) -> None:
    """Asking the evaluation for a tracked width at the final step returns the tracked
    profile bit for bit; raw is the trained net; another width is a mix of snapshots."""
    job = plan_points(compose_points([*toy_overrides, "train.ema_snapshots=4"])).trainings[0]
    store = Store(tmp_path / "results")
    train(job, store)
    steps = job.config.train.steps
    assert [p.name for p in store.ema_snapshot_paths(job.key)] == [
        f"snapshot-{k:09d}.pt" for k in (10, 20, 30, 40)]
    trainee, final = load_trained(job, store)
    assert evaluation_net(trainee, store, job.key, "raw", steps) is trainee.net
    tracked = evaluation_net(trainee, store, job.key, 0.05, steps).state_dict()
    for name, value in trainee.ema.profiles["0.05"].items():
        assert torch.equal(tracked[name], value), name
    mixed = evaluation_net(trainee, store, job.key, 0.2, steps).state_dict()
    assert any(not torch.equal(mixed[n], trainee.ema.profiles["0.1"][n]) for n in mixed)
    assert evaluation_net(trainee, store, job.key, 0.2, steps).state_dict().keys() == mixed.keys()
