"""Flow Matching (rectified flow, linear path): the multi-step baseline.  docs/methods.md §1.

- Path ``z_t = (1 - t) x + t eps`` with ``t = 1`` noise; the network predicts the marginal
  velocity ``v(z, t) = E[eps - x | z_t = z]``; loss ``||v_theta(z_t, t, y) - (eps - x)||^2``
  (mean over dimensions and batch), one forward and one backward per step.
- Time sampler: logit-normal(-0.4, 1.0) by default, the sampler MeanFlow uses, so the
  comparison differs only in the method; ``time_sampler=uniform`` gives U(0, 1) (CFM/SiT).
- Label dropout per sample with p = 0.1 (DiT/SiT).  facebookresearch/flow_matching drops
  the label for the whole batch instead; we follow the per-sample standard.
- Sampling: Euler on the uniform grid ``t_i = 1 - i/N`` (N = nfe steps), or Heun (two
  passes per step except the last).  CFG ``v_u + omega (v_c - v_u)``; a guided step evaluates
  conditional and unconditional velocity in one doubled batch, i.e. two passes per sample.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from methods.base import Batch, Method, broadcast_time, drop_labels, sample_logit_normal
from methods.specs.fm import FlowMatchingConfig, FlowMatchingSpec


def sample_time(cfg: FlowMatchingConfig, n: int, generator: torch.Generator, device) -> Tensor:
    """Training times t in (0, 1), shape (n,), from the configured sampler."""
    if cfg.time_sampler == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if cfg.time_sampler == "logit_normal":
        return sample_logit_normal(n, cfg.time_mean, cfg.time_std, generator, device)
    raise ValueError(
        f"method.time_sampler='{cfg.time_sampler}' is unknown; expected uniform or logit_normal"
    )


def cfg_velocity(
    net: nn.Module, z: Tensor, t: Tensor, labels: Tensor, null_label: int, guidance: float
) -> Tensor:
    """v_u + omega (v_c - v_u), with conditional and unconditional passes in one batch.
    ``guidance = 1`` is a single conditional pass."""
    if guidance == 1.0:
        return net(z, {"t": t}, labels)
    both = net(
        torch.cat([z, z]), {"t": torch.cat([t, t])},
        torch.cat([labels, torch.full_like(labels, null_label)]),
    )
    v_c, v_u = both.chunk(2)
    return v_u + guidance * (v_c - v_u)


class FlowMatching(Method):
    spec = FlowMatchingSpec()

    def loss(
        self, net: nn.Module, batch: Batch, *, step: int, generator: torch.Generator,
        teacher: nn.Module | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        x, device = batch.x, batch.x.device
        t = sample_time(self.cfg, x.shape[0], generator, device)
        eps = torch.randn(x.shape, generator=generator, device=device)
        z = (1 - broadcast_time(t, x)) * x + broadcast_time(t, x) * eps
        y = drop_labels(batch.y, self.cfg.label_dropout, self.null_label, generator)
        v_pred = net(z, {"t": t}, y)
        loss = (v_pred - (eps - x)).pow(2).mean()
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def sample(
        self, net: nn.Module, noise: Tensor, labels: Tensor, *, nfe: int,
        guidance: float = 1.0, fresh_noise=None, solver: str = "euler", **eval_params: Any,
    ) -> Tensor:
        grid = torch.linspace(1.0, 0.0, nfe + 1, device=noise.device)
        z = noise
        velocity = lambda z, t: cfg_velocity(  # noqa: E731
            net, z, t.expand(z.shape[0]), labels, self.null_label, guidance
        )
        for i in range(nfe):
            t, s = grid[i], grid[i + 1]
            v = velocity(z, t)
            if solver == "heun" and i < nfe - 1:
                z_euler = z - (t - s) * v
                v = 0.5 * (v + velocity(z_euler, s))
            elif solver not in ("euler", "heun"):
                raise ValueError(f"method.solver='{solver}' is unknown; expected euler or heun")
            z = z - (t - s) * v
        return z
