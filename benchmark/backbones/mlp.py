"""MLP backbone for low-dimensional (1-D / 2-D toy) data, same interface as the DiT.

Conditioning modulates rather than concatenates: every hidden layer's pre-activation is
scaled and shifted by a projection of the condition embedding (FiLM, the adaLN idea).  A
plain MLP fed (z, t, r) as extra inputs learns the z * a(t) structure of the exact fields
far too slowly for MeanFlow/iMF (METHODS.md §10).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from benchmark.backbones.embed import ConditionEmbedder


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
        return torch.nn.functional.silu(self.linear(h) * (1 + scale) + shift)


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
        self.embed = ConditionEmbedder(slots, num_classes, cond_dim)
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

    def forward(
        self, x: Tensor, cond: dict[str, Tensor], y: Tensor, return_aux: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        if return_aux and not self.aux_depth:
            raise ValueError("return_aux=True needs a backbone built with aux_depth > 0")
        c = torch.nn.functional.silu(self.embed(cond, y))
        h = torch.nn.functional.silu(self.inp(x.flatten(1)))
        for layer in self.trunk:
            h = layer(h, c)
        out = self._head(h, c, self.tail, self.out).view_as(x)
        if not return_aux:
            return out
        return out, self._head(h, c, self.aux_tail, self.aux_out).view_as(x)
