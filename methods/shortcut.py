"""Shortcut models (Frans et al., arXiv 2410.12557).  docs/methods.md §2.

Follows the official JAX code (kvfrans/shortcut-models ``targets_shortcut.py``,
``helper_inference.py``); the deliberate differences are listed at the end.

Native convention, converted only inside this module
----------------------------------------------------
Shortcut runs time the other way round from the suite: **native t = 0 is noise, t = 1
data**, ``x_t = (1 - (1 - eps_min) t) x0 + t x1`` with x0 noise, x1 data (eps_min = 1e-5 as
official).  The network ``s(x_t, t, k, y)`` is the normalised jump, ``x_{t+d} ~ x_t + d s``,
for step sizes d = 2^-k, k = 0..log2(M).  Suite noise (meant for suite t = 1) *is* x0 at
native t = 0, so sampling starts from it unchanged and returns native t = 1, i.e. data
(suite t = 0); native t = 1 - suite t, and no other conversion is needed.

Conditioning slots carry the **native** values, raw: ``"t"`` is native t in [0, 1] (0 =
noise), ``"d"`` is the integer level k = log2(1/d) as a float in 0..log2(M) (the official
code feeds k, not d, to a second timestep embedder).

Training batch (B samples)
--------------------------
- Self-consistency (SC) part, the first ``B // bootstrap_every`` samples: levels
  k = log2(M)-1, ..., 0 (d = 2/M ... 1) get ``(B // bootstrap_every) // log2(M)`` samples
  each, the remainder gets k = 0 (d = 1); t = j d with j ~ U{0..1/d - 1}.  Target, no
  gradient, from the teacher, an EMA of the net kept by the harness at ``teacher_decay``
  with its half-life capped at ``teacher_rampup`` of the steps done (``bootstrap_ema``;
  the online net when no teacher is passed):
  ``s1 = s(x_t, t, k+1)``, ``x' = clip(x_t + (d/2) s1)``, ``s2 = s(x', t + d/2, k+1)``,
  ``target = clip((s1 + s2) / 2)``, clip = ``bootstrap_clip`` = 4.  The +-4 was tuned for
  SD-VAE latents (scaled by ~0.18); for data in [-1, 1] it is loose and almost never binds.
  SC labels are never dropped.  The teacher runs in eval mode (official ``train=False``).
- Flow-matching (FM) part, the rest: finest level k = log2(M), t ~ U{0, 1/M, ..., (M-1)/M},
  target ``x1 - (1 - eps_min) x0``, labels dropped with p = ``label_dropout``.
- CFG baked into SC targets (``bootstrap_cfg_scale`` w != 1, official ImageNet 1.5): only
  the first ``(B // bootstrap_every) // log2(M)`` SC samples -- level log2(M)-1, d = 2/M,
  whose half steps sit at the FM level k = log2(M) -- use guided half steps
  ``s_u + w (s_c - s_u)``, the unconditional pass at the same (FM) level, time and point;
  larger d inherit the guidance through the self-consistency chain.  Each half step is
  one backbone call on the SC samples plus the unconditional copies.
- Loss: plain MSE, mean over dimensions and batch.  No JVP, no adaptive weight.  Cost:
  one forward+backward on B and two no-grad forwards on B/8 (~1.25x a FM step).

Sampling
--------
N = nfe steps, d = 1/N, ``x <- x + d s(x, i/N, log2 N)`` for i = 0..N-1; N must be a power of
two <= M.  CFG at inference: ``s_u + w (s_c - s_u)`` from one doubled call (2 passes/step).

Choices where sources differ
----------------------------
- Batch split: the official code takes the FM part from indices ``[:7B/8]`` of the batch,
  so the first B/8 images serve both parts and the last B/8 are never used (issue #10).
  Here the first B/8 samples are SC and the remaining 7B/8 are FM: every sample used once.
- The official code feeds the SC and FM parts noise and times from shared PRNG keys; here
  every draw is independent (from the ``generator``).
- With w = 1 or unconditional data (null label only, so s_c = s_u) the unconditional
  copies are skipped: identical targets, fewer passes.  The official code also doubles
  at w = 1 when ``bootstrap_cfg`` is on.
- The SC fraction 1/8 is the code's; the paper's text may state another ratio (§9).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from methods.base import Batch, Method, broadcast_time, drop_labels
from methods.specs.shortcut import ShortcutConfig, ShortcutSpec, num_levels

# -- the path in the native convention (t = 0 noise) ------------------------------------------


def interpolate(noise: Tensor, data: Tensor, t: Tensor, eps_min: float) -> Tensor:
    """x_t = (1 - (1 - eps_min) t) noise + t data; noise, data (B, *shape), t (B,) native."""
    t_ = broadcast_time(t, data)
    return (1 - (1 - eps_min) * t_) * noise + t_ * data


def flow_target(noise: Tensor, data: Tensor, eps_min: float) -> Tensor:
    """d x_t / dt = data - (1 - eps_min) noise, (B, *shape): the FM-level regression target."""
    return data - (1 - eps_min) * noise


def sc_levels(n_sc: int, denoise_timesteps: int, device: torch.device | str = "cpu") -> Tensor:
    """Levels k of the self-consistency samples, shape (n_sc,) long: log2(M)-1, ..., 0 with
    ``n_sc // log2(M)`` samples each (smallest d first), the remainder at k = 0 (d = 1)."""
    n_lv = num_levels(denoise_timesteps)
    per_level = n_sc // n_lv
    levels = torch.arange(n_lv - 1, -1, -1, device=device).repeat_interleave(per_level)
    return torch.cat([levels, torch.zeros(n_sc - levels.numel(), dtype=torch.long, device=device)])


def grid_times(levels: Tensor, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """t = j 2^-k with j ~ U{0..2^k - 1} per sample: native times on each level's d-grid, (n,)."""
    sections = (2**levels).to(dtype)
    u = torch.rand(levels.shape, generator=generator, device=levels.device, dtype=dtype)
    j = torch.minimum((u * sections).floor(), sections - 1)
    return j / sections


# -- the self-consistency (bootstrap) target ----------------------------------------------------


def _jump(
    net: nn.Module, x: Tensor, t: Tensor, level: Tensor, y: Tensor,
    n_guided: int, cfg_scale: float, null_label: int,
) -> Tensor:
    """s(x, t, level | y), (n, *shape); the first ``n_guided`` rows guided
    ``s_u + w (s_c - s_u)`` with the unconditional copies appended to the same call."""
    if n_guided == 0 or cfg_scale == 1.0:
        return net(x, {"t": t, "d": level}, y)
    g = slice(0, n_guided)
    out = net(
        torch.cat([x, x[g]]), {"t": torch.cat([t, t[g]]), "d": torch.cat([level, level[g]])},
        torch.cat([y, torch.full_like(y[g], null_label)]),
    )
    s_c, s_u = out[: x.shape[0]], out[x.shape[0]:]
    guided = s_u + cfg_scale * (s_c[g] - s_u)
    return torch.cat([guided, s_c[n_guided:]])


def two_step_average(
    net: nn.Module, x: Tensor, t: Tensor, level: Tensor, step: Tensor, y: Tensor, *,
    clip: float, n_guided: int = 0, cfg_scale: float = 1.0, null_label: int = 0,
) -> Tensor:
    """(s1 + s2) / 2 clipped, s1 = s(x, t, level), s2 = s(clip(x + step s1), t + step, level).

    x (n, *shape) at native time t (n,) (t = 0 noise); ``level`` (n,) float is the level of
    both calls and ``step`` (n,) their step size.  The bootstrap target uses half steps
    (level k+1, step d/2) for a target at level k; the same arithmetic with full steps is
    the wrong target (the tests' control)."""
    step_ = broadcast_time(step, x)
    s1 = _jump(net, x, t, level, y, n_guided, cfg_scale, null_label)
    x_mid = (x + step_ * s1).clamp(-clip, clip)
    s2 = _jump(net, x_mid, t + step, level, y, n_guided, cfg_scale, null_label)
    return (0.5 * (s1 + s2)).clamp(-clip, clip)


def bootstrap_target(
    net: nn.Module, x_t: Tensor, t: Tensor, level: Tensor, y: Tensor, *,
    clip: float, n_guided: int = 0, cfg_scale: float = 1.0, null_label: int = 0,
) -> Tensor:
    """Self-consistency target for s(x_t, t, d = 2^-level), (n, *shape), without gradient:
    two half steps of size d/2 at level+1, so s(x, t, 2d) = [s(x, t, d) + s(x', t + d, d)] / 2.
    Native convention (t = 0 noise); ``level`` (n,) long or float."""
    if x_t.shape[0] == 0:
        return torch.zeros_like(x_t)
    half_level = level.to(x_t.dtype) + 1
    half_step = torch.exp2(-half_level)
    with torch.no_grad(), _eval_mode(net):
        return two_step_average(
            net, x_t, t, half_level, half_step, y,
            clip=clip, n_guided=n_guided, cfg_scale=cfg_scale, null_label=null_label,
        )


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    """The teacher runs with train=False (official); restore each submodule's flag after."""
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.train(flag)


# -- the training batch --------------------------------------------------------------------------


@dataclass
class ShortcutTargets:
    """Inputs and regression targets of one training batch, native convention (t = 0 noise).

    ``x_t`` (B, *shape); ``t`` (B,) native time; ``level`` (B,) float k (d = 2^-k);
    ``y`` (B,) labels fed to the online net; ``target`` (B, *shape) without gradient.
    Rows ``[:n_sc]`` are self-consistency samples, the rest flow matching."""

    x_t: Tensor
    t: Tensor
    level: Tensor
    y: Tensor
    target: Tensor
    n_sc: int


class Shortcut(Method):
    spec = ShortcutSpec()

    def __init__(self, cfg: ShortcutConfig, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.fm_level = num_levels(cfg.denoise_timesteps)

    def targets(self, teacher: nn.Module, batch: Batch, generator: torch.Generator) -> ShortcutTargets:
        """Build the SC and FM parts of a batch; ``teacher`` computes the SC targets."""
        cfg, x = self.cfg, batch.x
        n_sc = x.shape[0] // cfg.bootstrap_every
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

        # Self-consistency part: t on each level's grid, labels kept.
        sc_level = sc_levels(n_sc, cfg.denoise_timesteps, x.device)
        sc_t = grid_times(sc_level, generator, x.dtype)
        sc_x = interpolate(noise[:n_sc], x[:n_sc], sc_t, cfg.eps_min)
        sc_target = bootstrap_target(
            teacher, sc_x, sc_t, sc_level, batch.y[:n_sc],
            clip=cfg.bootstrap_clip, n_guided=self._n_guided(n_sc),
            cfg_scale=cfg.bootstrap_cfg_scale, null_label=self.null_label,
        )

        # Flow-matching part: finest level, t ~ U{0, 1/M, ..., (M-1)/M}, labels dropped.
        n_fm, m = x.shape[0] - n_sc, cfg.denoise_timesteps
        fm_t = torch.randint(0, m, (n_fm,), generator=generator, device=x.device).to(x.dtype) / m
        fm_x = interpolate(noise[n_sc:], x[n_sc:], fm_t, cfg.eps_min)
        fm_y = drop_labels(batch.y[n_sc:], cfg.label_dropout, self.null_label, generator)
        fm_level = torch.full((n_fm,), float(self.fm_level), device=x.device, dtype=x.dtype)

        return ShortcutTargets(
            x_t=torch.cat([sc_x, fm_x]),
            t=torch.cat([sc_t, fm_t]),
            level=torch.cat([sc_level.to(x.dtype), fm_level]),
            y=torch.cat([batch.y[:n_sc], fm_y]),
            target=torch.cat([sc_target, flow_target(noise[n_sc:], x[n_sc:], cfg.eps_min)]),
            n_sc=n_sc,
        )

    def _n_guided(self, n_sc: int) -> int:
        """SC samples with guided half steps: the level log2(M)-1 block, when CFG is on."""
        if self.cfg.bootstrap_cfg_scale == 1.0 or self.num_classes == 0:
            return 0
        return n_sc // self.fm_level

    def loss(
        self, net: nn.Module, batch: Batch, *, step: int, generator: torch.Generator,
        teacher: nn.Module | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        tg = self.targets(teacher if teacher is not None else net, batch, generator)
        pred = net(tg.x_t, {"t": tg.t, "d": tg.level}, tg.y)
        err = (pred - tg.target).pow(2).flatten(1).mean(1)
        loss = err.mean()
        logs = {"loss": loss.item(), "loss_fm": err[tg.n_sc:].mean().item()}
        if tg.n_sc:
            logs["loss_sc"] = err[: tg.n_sc].mean().item()
        return loss, logs

    @torch.no_grad()
    def sample(
        self, net: nn.Module, noise: Tensor, labels: Tensor, *, nfe: int,
        guidance: float = 1.0, fresh_noise=None, **eval_params: Any,
    ) -> Tensor:
        """Noise (B, *shape) -- x0 at native t = 0, i.e. suite t = 1 -- to data at native
        t = 1 (suite t = 0) with ``nfe`` Euler jumps of size 1/nfe at level log2(nfe)."""
        self.spec.validate(self.cfg, nfe, guidance)
        b, d = noise.shape[0], 1.0 / nfe
        level = noise.new_full((b,), float(nfe.bit_length() - 1))
        x = noise
        for i in range(nfe):
            t = noise.new_full((b,), i * d)
            x = x + d * self._guided_jump(net, x, t, level, labels, guidance)
        return x

    def _guided_jump(
        self, net: nn.Module, x: Tensor, t: Tensor, level: Tensor, labels: Tensor, guidance: float
    ) -> Tensor:
        """s_u + w (s_c - s_u) from one doubled call; w = 1 is a single conditional call."""
        if guidance == 1.0:
            return net(x, {"t": t, "d": level}, labels)
        both = net(
            torch.cat([x, x]), {"t": torch.cat([t, t]), "d": torch.cat([level, level])},
            torch.cat([labels, torch.full_like(labels, self.null_label)]),
        )
        s_c, s_u = both.chunk(2)
        return s_u + guidance * (s_c - s_u)
