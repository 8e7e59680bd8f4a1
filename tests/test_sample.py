"""Sampling harness: per-sample seeded noise and counted NFE."""

from __future__ import annotations

import torch
from torch import nn

from benchmark.sample import generate, per_sample_noise
from methods.fm import FlowMatching
from methods.specs.fm import FlowMatchingConfig


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x, cond, y, return_aux=False):
        return self.lin(x) * cond["t"][:, None] + 0.1 * y[:, None]


def test_same_seed_gives_identical_samples_regardless_of_batch_size() -> None:
    torch.manual_seed(0)
    net, fm = Linear(), FlowMatching(FlowMatchingConfig(), num_classes=3)
    labels = torch.arange(10) % 3
    runs = [generate(fm, net, shape=(2,), labels=labels, nfe=3, guidance=2.0, seed=7, batch_size=b)
            for b in (1, 3, 10)]
    # noise is bitwise identical; BLAS may round a batched matmul differently by ~1 ulp
    for other in runs[1:]:
        assert torch.allclose(runs[0].samples, other.samples, rtol=0, atol=1e-6)


def test_noise_of_a_sample_depends_only_on_seed_index_and_stream() -> None:
    a = per_sample_noise(5, range(0, 4), (3,))
    b = per_sample_noise(5, [2, 3], (3,))
    assert torch.equal(a[2:], b)
    assert not torch.equal(per_sample_noise(5, [2], (3,), stream=1), b[:1])
    assert not torch.equal(per_sample_noise(6, [2], (3,)), b[:1])


def test_counted_nfe_equals_declared_cost_with_and_without_cfg() -> None:
    net, fm = Linear(), FlowMatching(FlowMatchingConfig(), num_classes=3)
    labels = torch.arange(6) % 3
    for nfe in (1, 2, 5):
        for guidance in (1.0, 3.0):
            for solver in ("euler", "heun"):
                cfg = FlowMatchingConfig(solver=solver)
                out = generate(fm, net, shape=(2,), labels=labels, nfe=nfe, guidance=guidance, seed=0,
                               batch_size=4, eval_params={"solver": solver})
                assert out.nfe_counted == fm.spec.nfe_cost(cfg, nfe, guidance)
    assert fm.spec.nfe_cost(FlowMatchingConfig(), 4, 2.0) == 8


def test_guidance_one_equals_the_unguided_sampler() -> None:
    torch.manual_seed(0)
    net, fm = Linear(), FlowMatching(FlowMatchingConfig(), num_classes=3)
    noise, labels = torch.randn(6, 2), torch.arange(6) % 3
    guided = fm.sample(net, noise, labels, nfe=4, guidance=1.0)
    z = noise
    for i in range(4):
        t = torch.full((6,), 1 - i / 4)
        z = z - 0.25 * net(z, {"t": t}, labels)
    assert torch.allclose(guided, z, atol=1e-6)
