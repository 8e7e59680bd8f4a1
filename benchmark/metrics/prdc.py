"""Improved precision and recall (Kynkaanniemi et al., 2019), with density and coverage
(Naeem et al., 2020), from k-nearest-neighbour balls in feature space.

Each real feature r_i gets the ball of radius ``rho_k(r_i)``, the distance to its k-th
nearest other real feature (k = 3, the papers' choice); each generated feature f_j the ball
of radius ``rho_k(f_j)`` among generated features.  Then

- precision = fraction of generated f_j inside at least one real ball (fidelity);
- recall    = fraction of real r_i inside at least one generated ball (diversity);
- density   = (1 / (k M)) sum_j #{i : |f_j - r_i| <= rho_k(r_i)}  (can exceed 1);
- coverage  = fraction of real r_i whose nearest generated f_j lies inside r_i's ball.

Precision and recall use torch-fidelity's convention (``<=`` on the radius; the k-th
neighbour is counted after the point itself), so they equal its ``prc`` metric on the same
features (tested).  Distances are Euclidean, in float64, in row blocks: memory is
O(block * N).  At most ``max_samples`` of each set are used (a fixed seeded subset): the
values depend on the sample size, so compare rows with equal N.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NEAREST_K = 3
BLOCK_ROWS = 1024
MAX_SAMPLES = 10_000


def kth_neighbour_radii(features: Tensor, k: int = NEAREST_K) -> Tensor:
    """(N, D) -> (N,): distance from each row to its k-th nearest other row."""
    if len(features) <= k:
        raise ValueError(f"{len(features)} features cannot give a {k}-th nearest neighbour; "
                         f"expected more than {k} samples for precision/recall")
    radii = [torch.cdist(block, features).kthvalue(k + 1, dim=1).values  # +1: itself at 0
             for block in features.split(BLOCK_ROWS)]
    return torch.cat(radii)


def _subset(features: np.ndarray, limit: int, generator: torch.Generator) -> Tensor:
    rows = torch.from_numpy(np.asarray(features, dtype=np.float64))
    if len(rows) <= limit:
        return rows
    return rows[torch.randperm(len(rows), generator=generator)[:limit].sort().values]


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = NEAREST_K, seed: int = 0,
                     max_samples: int = MAX_SAMPLES) -> dict[str, float]:
    """Precision, recall, density and coverage of fake (M, D) against real (N, D) features."""
    generator = torch.Generator().manual_seed(seed)
    real_t, fake_t = _subset(real, max_samples, generator), _subset(fake, max_samples, generator)
    real_radii, fake_radii = kth_neighbour_radii(real_t, k), kth_neighbour_radii(fake_t, k)
    precise = torch.zeros(len(fake_t), dtype=torch.bool)
    inside_count = torch.zeros(len(fake_t), dtype=torch.float64)
    recalled = torch.zeros(len(real_t), dtype=torch.bool)
    nearest_fake = torch.full((len(real_t),), float("inf"), dtype=torch.float64)
    for lo in range(0, len(fake_t), BLOCK_ROWS):
        block = fake_t[lo:lo + BLOCK_ROWS]
        dist = torch.cdist(block, real_t)                      # (block, N)
        inside_real = dist <= real_radii[None]
        precise[lo:lo + len(block)] = inside_real.any(dim=1)
        inside_count[lo:lo + len(block)] = inside_real.sum(dim=1).double()
        recalled |= (dist <= fake_radii[lo:lo + len(block), None]).any(dim=0)
        nearest_fake = torch.minimum(nearest_fake, dist.min(dim=0).values)
    return {
        "precision": precise.double().mean().item(),
        "recall": recalled.double().mean().item(),
        "density": (inside_count.sum() / (k * len(fake_t))).item(),
        "coverage": (nearest_fake < real_radii).double().mean().item(),
    }
