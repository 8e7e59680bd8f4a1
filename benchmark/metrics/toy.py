"""Sample metrics for the toy densities, against FRESH exact samples (never the train set).

- ``swd``: sliced Wasserstein-1.  The data and the reference are projected on
  ``num_projections`` random unit directions (drawn from the seeded generator) and the
  exact 1-D W1 between the two projected empirical distributions is averaged over the
  directions.  For 1-D data there is nothing to slice: it is the exact 1-D W1 (a shift by
  ``s`` gives ``|s|``).  In d dimensions a shift by the vector ``s`` gives
  ``|s| E|theta_1|`` (0.64 |s| in 2-D), not ``|s|``.
- ``mmd``: unbiased estimate of MMD^2 (U-statistics within each set, so it can be slightly
  negative) on the first ``mmd_samples`` (default 2000) samples and reference samples, with the kernel ``mean_h exp(-|a - b|^2 / (2 h^2))`` over bandwidths
  ``h in median * (0.5, 1, 2)``, ``median`` the median pairwise distance of (up to 1000 of)
  the reference samples.  The bandwidths depend only on the dataset and the seed, so
  methods are scored with the same kernel.
- ``mean``, ``std``: per-coordinate moments of the samples, and ``mean_err`` /
  ``std_err``, the Euclidean distance to the analytic moments (NaN where unknown).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from benchmark.data import Dataset
from benchmark.metrics.uncertainty import Z95

MEDIAN_SUBSET = 1000          # points used for the median-distance bandwidth
MMD_SAMPLES = 2000            # points per side in the O(N M) MMD: ~0.5 s on one thread
BANDWIDTH_FACTORS = (0.5, 1.0, 2.0)
KERNEL_ROWS = 256             # row block of the pairwise kernel: bounds memory


def wasserstein_1d(x: Tensor, y: Tensor, p: int = 1) -> Tensor:
    """Exact Wp (p = 1 or 2) between empirical distributions, column by column.

    x: (N, L), y: (M, L) (or (N,), (M,)) -> (L,) (or a scalar).  N and M may differ: the
    integral of |F_x^-1(u) - F_y^-1(u)| over u is summed over the merged quantile steps.
    """
    squeeze = x.dim() == 1
    xs, ys = (t.double().reshape(len(t), -1).sort(dim=0).values for t in (x, y))
    wp = wasserstein_sorted(xs, ys, p)
    return wp[0] if squeeze else wp


def wasserstein_sorted(xs: Tensor, ys: Tensor, p: int) -> Tensor:
    """:func:`wasserstein_1d` of columns already sorted ascending: xs (N, L), ys (M, L) -> (L,)."""
    n, m = len(xs), len(ys)
    if n == m:  # equal sizes: the quantile functions pair sorted rows
        return (xs - ys).abs().pow(p).mean(dim=0).pow(1.0 / p)
    steps = [torch.arange(1, k + 1, dtype=torch.float64) / k for k in (n, m)]
    levels = torch.cat(steps)
    levels = levels.unique()  # sorted; quantile functions are constant between levels
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mids = levels - widths / 2
    ix = (mids * n).long().clamp(max=n - 1)
    iy = (mids * m).long().clamp(max=m - 1)
    return (widths[:, None] * (xs[ix] - ys[iy]).abs().pow(p)).sum(dim=0).pow(1.0 / p)


def resampled_sorted(values: Tensor, order: Tensor, counts: Tensor) -> Tensor:
    """The columns of ``x[rows]`` sorted, without sorting: ``values``/``order`` (N, L) are
    ``x.sort(dim=0)`` and ``counts`` (N,) how often each row of x is drawn (sum N): each
    sorted value is repeated as often as its row was drawn."""
    n, columns = values.shape
    per_column = counts.long()[order].T.reshape(-1)  # column by column, in sorted order
    index = torch.arange(n).repeat(columns).repeat_interleave(per_column).view(columns, n).T
    return values.gather(0, index)


def sliced_wasserstein(
    x: Tensor, y: Tensor, *, num_projections: int = 128, generator: torch.Generator, p: int = 1
) -> float:
    """Sliced Wp between samples x (N, d) and y (M, d): (mean over random unit directions of
    Wp^p of the projections)^(1/p); exact Wp when d = 1."""
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    if x.shape[1] == 1:
        return float(wasserstein_1d(x, y, p)[0])
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    return float(wasserstein_1d(x @ theta, y @ theta, p).pow(p).mean().pow(1.0 / p))


def _kernel_sum(a: Tensor, b: Tensor, bandwidths: Sequence[float]) -> float:
    """Sum over all pairs of the mixed RBF kernel between a (N, d) and b (M, d)."""
    total = 0.0
    inv = torch.tensor([1 / (2 * h * h) for h in bandwidths], dtype=torch.float64)
    for block in a.split(KERNEL_ROWS):
        sq = torch.cdist(block, b).square()                    # (rows, M), float64
        kernel = torch.exp(-sq[None] * inv[:, None, None]).mean(dim=0)
        total += kernel.sum().item()
    return total


def median_bandwidths(reference: Tensor) -> list[float]:
    """Bandwidths ``median * (0.5, 1, 2)`` from the median pairwise distance of (N, d)."""
    points = reference.reshape(len(reference), -1).double()[:MEDIAN_SUBSET]
    distances = torch.pdist(points)
    median = distances.median().item() if len(distances) else 1.0
    return [median * f for f in BANDWIDTH_FACTORS] if median > 0 else [1.0]


def mmd_rbf(x: Tensor, y: Tensor, *, bandwidths: Sequence[float]) -> float:
    """Unbiased MMD^2 between x (N, d) and y (M, d), N, M >= 2, with a mixed RBF kernel."""
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    n, m = len(x), len(y)
    # The kernel is 1 on the diagonal: subtracting n (m) leaves the off-diagonal U-statistic.
    k_xx = (_kernel_sum(x, x, bandwidths) - n) / (n * (n - 1))
    k_yy = (_kernel_sum(y, y, bandwidths) - m) / (m * (m - 1))
    k_xy = _kernel_sum(x, y, bandwidths) / (n * m)
    return k_xx + k_yy - 2 * k_xy


def _moment_error(measured: Tensor, analytic: Sequence[float] | None) -> float:
    """Euclidean distance between measured moments (d,) and analytic ones, NaN if unknown."""
    if analytic is None:
        return math.nan
    return (measured - torch.tensor(analytic, dtype=torch.float64)).norm().item()


def _check_toy_inputs(
    samples: Tensor, dataset: Dataset, num_reference: int, mmd_samples: int
) -> None:
    """One clear message per misuse: no exact sampler, wrong shape, non-finite values."""
    if dataset.exact_sampler is None:
        raise ValueError(f"dataset {dataset.name!r} has no exact sampler; evaluate_toy needs "
                         "a toy dataset (checkerboard, eight_gaussians, two_moons, spirals, "
                         "gaussian1d, gaussian2d)")
    if not isinstance(samples, Tensor) or tuple(samples.shape[1:]) != dataset.shape or len(samples) < 2:
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"samples have shape {shape}; expected (N >= 2, "
                         f"{', '.join(map(str, dataset.shape))}) for dataset {dataset.name!r}")
    if num_reference < 2 or mmd_samples < 2:
        raise ValueError(f"num_reference={num_reference}, mmd_samples={mmd_samples}; expected "
                         "at least 2 each (defaults 10000 and 2000)")
    bad = (~torch.isfinite(samples)).sum().item()
    if bad:
        raise ValueError(f"samples hold {bad} NaN/inf value(s); expected finite samples "
                         "(a diverged sampler?)")


def _directions(dim: int, num_projections: int, generator: torch.Generator) -> Tensor:
    """(dim, L) unit projection directions; the identity (no slicing) for 1-D data."""
    if dim == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    theta = torch.randn(dim, num_projections, generator=generator, dtype=torch.float64)
    return theta / theta.norm(dim=0, keepdim=True)


def _sliced_w1_w2(proj_sorted: Tensor, ref_sorted: Tensor) -> tuple[float, float]:
    """(sliced W1, sliced W2) of sorted projected samples (N, L) against sorted projected
    reference samples (M, L): mean over directions of W1, and sqrt of the mean of W2^2."""
    w1 = wasserstein_sorted(proj_sorted, ref_sorted, 1).mean().item()
    w2 = wasserstein_sorted(proj_sorted, ref_sorted, 2).pow(2).mean().sqrt().item()
    return w1, w2


def _kernel_matrix(a: Tensor, b: Tensor, bandwidths: Sequence[float]) -> Tensor:
    """The mixed RBF kernel between a (N, d) and b (M, d), (N, M) float64."""
    inv = torch.tensor([1 / (2 * h * h) for h in bandwidths], dtype=torch.float64)
    sq = torch.cdist(a.double(), b.double()).square()
    return torch.exp(-sq[None] * inv[:, None, None]).mean(dim=0)


def evaluate_toy(
    samples: Tensor,
    dataset: Dataset,
    *,
    num_reference: int = 10_000,
    seed: int = 0,
    num_projections: int = 128,
    mmd_samples: int = MMD_SAMPLES,
    draws: int = 100,
) -> dict[str, float | list[float]]:
    """Score samples (N, *shape) of a toy dataset against ``num_reference`` fresh exact samples.

    The generator seeded with ``seed`` first draws the projections' seed, then the
    reference samples, so both are fixed by ``seed`` alone (and independent).  Returns ``swd``
    (sliced W1), ``sw2`` (sliced W2; both exact W1 / W2 for 1-D data), ``mmd`` (floats),
    ``mean``, ``std`` (per-coordinate lists), ``mean_err``, ``std_err`` and ``intervals``:
    95% intervals of swd, sw2 and mmd, ``estimate +- 1.96 sd`` over ``draws`` bootstrap
    resamples of the samples against the same reference (MMD on its 2000-point subsets).
    """
    _check_toy_inputs(samples, dataset, num_reference, mmd_samples)
    generator = torch.Generator().manual_seed(seed)
    dim = math.prod(dataset.shape)
    projection_gen = torch.Generator().manual_seed(
        int(torch.randint(0, 2**62, (1,), generator=generator)))
    reference = dataset.exact_sampler(num_reference, generator).reshape(num_reference, dim)
    flat = samples.detach().cpu().reshape(len(samples), dim).double()
    mean, std = flat.mean(dim=0), flat.std(dim=0)
    bandwidths = median_bandwidths(reference)
    directions = _directions(dim, num_projections, projection_gen)
    reference = reference.double()
    ref_sorted = (reference @ directions).sort(dim=0).values
    proj_sorted, proj_order = (flat @ directions).sort(dim=0)
    # MMD on the first mmd_samples points.  A bootstrap draw is a vector of counts c per row:
    # its kernel sums are c^T K c (less the draw's own diagonal) and c . k_xy, and its sorted
    # projections are read off the sorted originals, so no draw re-sorts or re-gathers a matrix
    x, y = flat[:mmd_samples], reference[:mmd_samples]
    k_xx, k_xy = _kernel_matrix(x, x, bandwidths), _kernel_matrix(x, y, bandwidths).mean(dim=1)
    k_yy = (_kernel_sum(y, y, bandwidths) - len(y)) / (len(y) * (len(y) - 1))
    k_diag = k_xx.diagonal()

    def scores(counts: Tensor, mmd_counts: Tensor) -> dict[str, float]:
        resampled = resampled_sorted(proj_sorted, proj_order, counts)
        w1, w2 = _sliced_w1_w2(resampled, ref_sorted)
        n = mmd_counts.sum().item()
        pairs = (mmd_counts @ k_xx @ mmd_counts - mmd_counts @ k_diag).item()
        mmd = pairs / (n * (n - 1)) + k_yy - 2 * (mmd_counts @ k_xy).item() / n
        return {"swd": w1, "sw2": w2, "mmd": mmd}

    def draw(n: int, generator: torch.Generator) -> Tensor:
        return torch.bincount(torch.randint(n, (n,), generator=generator), minlength=n).double()

    ones = (torch.ones(len(flat), dtype=torch.float64), torch.ones(len(x), dtype=torch.float64))
    point = scores(*ones)
    boot_gen = torch.Generator().manual_seed(seed + 1)
    boots = [scores(draw(len(flat), boot_gen), draw(len(x), boot_gen)) for _ in range(draws)]
    intervals = {}
    for name, value in point.items():
        sd = torch.tensor([b[name] for b in boots], dtype=torch.float64).std().item() if draws > 1 else math.nan
        intervals[name] = [value - Z95 * sd, value + Z95 * sd]
    return {
        **point,
        "intervals": intervals,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "mean_err": _moment_error(mean, dataset.params.get("mean")),
        "std_err": _moment_error(std, dataset.params.get("std")),
    }
