"""MLP backbone for low-dimensional (1-D / 2-D toy) data, same interface as the DiT.

Scalar conditions in [0, 1] (t, r, h, omega, interval) are embedded from their value
itself, not from sinusoids (``embed.ScalarEmbedder``, kind ``linear``); Shortcut's integer
step level keeps the sinusoids.  Conditioning modulates rather than concatenates: every hidden layer's pre-activation is
scaled and shifted by a projection of the condition embedding (FiLM, the adaLN idea).  A
plain MLP fed (z, t, r) as extra inputs learns the z * a(t) structure of the exact fields
far too slowly for MeanFlow/iMF (docs/methods.md §10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.backbones.embed import CONTINUOUS_SLOTS, ConditionEmbedder
from benchmark.backbones.tangent import (
    layer_with_tangent,
    modulation_tangent,
    scalar_embedder_with_tangent,
    silu_tangent,
    silu_with_tangent,
)


class FiLMLayer(nn.Module):
    """h -> SiLU(Linear(h) * (1 + scale(c)) + shift(c)); the modulation starts at zero."""

    def __init__(self, width: int, cond_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.film = nn.Linear(cond_dim, 2 * width)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.film(c).chunk(2, dim=-1)
        return F.silu(self.linear(h) * (1 + scale) + shift)

    def forward_with_tangent(
        self, h: Tensor, dh: Tensor, c: Tensor, dc: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(forward(h, c), tangent) from the tangents dh (B, width) and dc (B, cond_dim)."""
        z, dz = layer_with_tangent(self.linear, h, dh)
        film, d_film = layer_with_tangent(self.film, c, dc)
        (scale, shift), (d_scale, d_shift) = film.chunk(2, dim=-1), d_film.chunk(2, dim=-1)
        pre = z * (1 + scale) + shift
        out = F.silu(pre)
        with torch.no_grad():
            d_pre = modulation_tangent(z, dz, 1 + scale, d_scale, d_shift)
            return out, silu_tangent(pre, d_pre)


def condition_with_tangent(
    embed: ConditionEmbedder, cond: dict[str, Tensor], y: Tensor, cond_tangents: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """(embed(cond, y), tangent), both (B, cond_dim): the label embedding is constant, each
    slot in ``cond_tangents`` adds its embedder's tangent (other slots: tangent 0)."""
    embed.check(cond)
    c = embed.labels(y)
    dc = torch.zeros_like(c)
    for s in embed.slots:
        embedder = embed.scalars[s]
        features = embedder.features(cond[s])
        e, de = scalar_embedder_with_tangent(embedder, features, cond_tangents.get(s))
        c = c + e
        if de is not None:
            with torch.no_grad():
                dc = dc + de
    return c, dc


class MLPBackbone(nn.Module):
    """x (B, D) or (B, *shape) -> same shape.  ``depth`` FiLM layers of ``width``;
    ``aux_depth`` final layers (and the output head) are duplicated into an auxiliary
    branch returned with ``return_aux=True`` (iMF's v-head)."""

    def __init__(
        self,
        *,
        shape: tuple[int, ...],
        num_classes: int,
        slots: tuple[str, ...],
        width: int = 128,
        depth: int = 4,
        cond_dim: int = 64,
        aux_depth: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= aux_depth < depth:
            raise ValueError(f"aux_depth={aux_depth} must be in [0, depth={depth})")
        self.shape = tuple(shape)
        dim = int(torch.Size(shape).numel())
        # continuous conditions enter as their value (one linear feature), Shortcut's level
        # as sinusoids: see embed.ScalarEmbedder and docs/methods.md (toy findings)
        self.embed = ConditionEmbedder(slots, num_classes, cond_dim, linear_slots=CONTINUOUS_SLOTS)
        self.inp = nn.Linear(dim, width)
        self.trunk = nn.ModuleList(FiLMLayer(width, cond_dim) for _ in range(depth - aux_depth))
        self.tail = nn.ModuleList(FiLMLayer(width, cond_dim) for _ in range(aux_depth))
        self.out = nn.Linear(width, dim)
        self.aux_depth = aux_depth
        if aux_depth:
            self.aux_tail = nn.ModuleList(FiLMLayer(width, cond_dim) for _ in range(aux_depth))
            self.aux_out = nn.Linear(width, dim)

    @property
    def slots(self) -> tuple[str, ...]:
        return self.embed.slots

    def _head(self, h: Tensor, c: Tensor, layers: nn.ModuleList, out: nn.Linear) -> Tensor:
        for layer in layers:
            h = layer(h, c)
        return out(h)

    def _head_with_tangent(
        self, h: Tensor, dh: Tensor, c: Tensor, dc: Tensor, layers: nn.ModuleList, out: nn.Linear
    ) -> tuple[Tensor, Tensor]:
        for layer in layers:
            h, dh = layer.forward_with_tangent(h, dh, c, dc)
        return layer_with_tangent(out, h, dh)

    def _check_return_aux(self, return_aux: bool) -> None:
        if return_aux and not self.aux_depth:
            raise ValueError("return_aux=True needs a backbone built with aux_depth > 0")

    def forward(
        self, x: Tensor, cond: dict[str, Tensor], y: Tensor, return_aux: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, *shape); cond {slot: (B,)}; y (B,) long -> (B, *shape), or (main, aux)."""
        self._check_return_aux(return_aux)
        c = F.silu(self.embed(cond, y))
        h = F.silu(self.inp(x.flatten(1)))
        for layer in self.trunk:
            h = layer(h, c)
        out = self._head(h, c, self.tail, self.out).view_as(x)
        if not return_aux:
            return out
        return out, self._head(h, c, self.aux_tail, self.aux_out).view_as(x)

    def jvp(
        self,
        x: Tensor,
        cond: dict[str, Tensor],
        y: Tensor,
        x_tangent: Tensor,
        cond_tangents: dict[str, Tensor],
        return_aux: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Forward-mode pass: (out, d_out), or ((out, aux), (d_out, d_aux)) with
        ``return_aux``, all (B, *shape).  ``out`` is ``forward(x, cond, y)`` by the same ops
        (on the autograd graph when grad is enabled); ``d_out`` is its derivative along
        (x_tangent (B, *shape), cond_tangents {slot: (B,)}, missing slots 0), computed
        without autograd (see ``benchmark/backbones/tangent.py``)."""
        self._check_return_aux(return_aux)
        unknown = sorted(set(cond_tangents) - set(self.slots))
        if unknown:
            raise ValueError(f"tangent given for slot(s) {unknown}; the MLP has slots {self.slots}")
        c_raw, dc_raw = condition_with_tangent(self.embed, cond, y, cond_tangents)
        c, dc = silu_with_tangent(c_raw, dc_raw)
        h, dh = silu_with_tangent(*layer_with_tangent(self.inp, x.flatten(1), x_tangent.flatten(1)))
        for layer in self.trunk:
            h, dh = layer.forward_with_tangent(h, dh, c, dc)
        out, d_out = self._head_with_tangent(h, dh, c, dc, self.tail, self.out)
        out, d_out = out.view_as(x), d_out.view_as(x)
        if not return_aux:
            return out, d_out
        aux, d_aux = self._head_with_tangent(h, dh, c, dc, self.aux_tail, self.aux_out)
        return (out, aux.view_as(x)), (d_out, d_aux.view_as(x))
