"""Embedders shared by every backbone: scalar conditions and class labels.

Time-like scalars are embedded raw (t in [0, 1], no x1000 scaling; docs/methods.md §6.6): with
a large scale the derivative of the network in t, which the JVP-based methods (MeanFlow,
iMF, sCM) differentiate through, grows by the same factor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SLOTS = ("t", "r", "h", "d", "omega", "t_min", "t_max")
"""Every scalar condition a method may declare (see methods/base.py)."""
CONTINUOUS_SLOTS = ("t", "r", "h", "omega", "t_min", "t_max")
"""Slots holding a continuous value in [0, 1] (TrigFlow t: [0, pi/2]); ``d`` is Shortcut's
integer step level 0 ... log2(M), which sinusoids resolve and a single linear feature does
not (Shortcut 1-NFE W2 0.048 linear against 0.018 sinusoidal on the 1-D Gaussian)."""


def sinusoidal(x: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """(B,) float -> (B, dim) [cos, sin] features of the raw value, frequencies from 1 down
    to 1/max_period (the DiT/MeanFlow ``TimestepEmbedder`` without the x1000 factor)."""
    half = dim // 2
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32  # float64 for gradient checks
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=dtype, device=x.device) / half
    )
    args = x.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ScalarEmbedder(nn.Module):
    """Raw scalar (B,) -> (B, hidden): features, then a 2-layer SiLU MLP.

    ``kind="sinusoidal"``: ``freq_dim`` sinusoidal features (the DiT/MeanFlow embedder).
    ``kind="linear"``: the value itself as the one feature, for small backbones on
    continuous conditions in [0, 1] (the toy MLP): with raw t in [0, 1] the sinusoids'
    frequencies 1 ... 1e-4 leave all but a few features nearly constant, which trained the
    JVP-based methods' fields several times more slowly (MeanFlow 1-NFE W2 on a 1-D
    Gaussian 0.105 against 0.063 at width 128, docs/methods.md)."""

    def __init__(self, hidden: int, freq_dim: int = 256, kind: str = "sinusoidal") -> None:
        super().__init__()
        if kind not in ("sinusoidal", "linear"):
            raise ValueError(f"unknown scalar embedding kind {kind!r}; expected sinusoidal or linear")
        self.kind = kind
        self.freq_dim = freq_dim if kind == "sinusoidal" else 1
        self.mlp = nn.Sequential(
            nn.Linear(self.freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def features(self, s: Tensor) -> Tensor:
        """(B,) -> (B, freq_dim) features of the raw value."""
        if self.kind == "linear":
            dtype = s.dtype if s.dtype == torch.float64 else torch.float32
            return s.to(dtype)[:, None]
        return sinusoidal(s, self.freq_dim)

    def features_tangent(self, features: Tensor, ds: Tensor) -> Tensor:
        """Tangent of :meth:`features` along ds (B,), from the primal features (B, freq_dim)."""
        if self.kind == "linear":
            return ds.to(features.dtype)[:, None]
        from benchmark.backbones.tangent import sinusoidal_tangent

        return sinusoidal_tangent(features, ds)

    def forward(self, s: Tensor) -> Tensor:
        return self.mlp(self.features(s))


class LabelEmbedder(nn.Module):
    """Labels (B,) in 0..K (K = the null label for CFG) -> (B, hidden)."""

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)


class ConditionEmbedder(nn.Module):
    """Sum of one ScalarEmbedder per requested slot and the label embedding:
    c = sum_s emb_s(cond[s]) + emb(y), shape (B, hidden).  Only the requested slots get
    parameters; a missing or unexpected slot is an error, so a method cannot silently
    feed the wrong condition."""

    def __init__(self, slots: tuple[str, ...], num_classes: int, hidden: int,
                 linear_slots: tuple[str, ...] = ()) -> None:
        super().__init__()
        unknown = [s for s in slots if s not in SLOTS]
        if unknown:
            raise ValueError(f"unknown conditioning slot(s) {unknown}; expected a subset of {SLOTS}")
        self.slots = tuple(slots)
        self.scalars = nn.ModuleDict({s: ScalarEmbedder(hidden, kind="linear" if s in linear_slots
                                                        else "sinusoidal") for s in self.slots})
        self.labels = LabelEmbedder(num_classes, hidden)

    def check(self, cond: dict[str, Tensor]) -> None:
        if set(cond) != set(self.slots):
            raise ValueError(
                f"backbone was built for conditioning slots {self.slots}, got {tuple(cond)}"
            )

    def forward(self, cond: dict[str, Tensor], y: Tensor) -> Tensor:
        self.check(cond)
        c = self.labels(y)
        for s in self.slots:
            c = c + self.scalars[s](cond[s])
        return c
