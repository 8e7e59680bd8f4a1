"""Uncertainty and sample-size effects of the feature-space metrics.

- **Intervals without regeneration.**  A 95% interval of a metric comes from bootstrapping
  the *generated* samples (rows drawn with replacement, the reference held fixed): the
  interval is ``estimate +- 1.96 sd_bootstrap`` (the normal bootstrap interval; a
  percentile interval would inherit the upward bias FD gets from the duplicated rows of
  each resample).  It measures the sampling noise of one evaluation, not the seed-to-seed
  spread of training, which tables measure across ``seed=`` repeats.
- **Floors at the same sample count.**  FD is biased upwards by a term that shrinks like
  1/N, so a floor (real held-out images against the same reference) is only comparable
  with rows scored on as many samples.  Digits have 297 held-out test images, so rows are
  also scored as ``fd_matched``: the mean FD of ``MATCHED_SUBSETS`` random subsets of that
  size of the generated samples, and the floor is the FD of the 297 test images, both
  against the train split.  (FD extrapolated to infinitely many samples, Chong & Forsyth
  2020, is :func:`fd_infinity`; from 297 images in 64 dimensions its extrapolation is too
  noisy to serve as a floor, measured: -0.69 +- 0.94.)
- **KID** is unbiased at any N (an unbiased MMD^2 with the cubic polynomial kernel), so its
  values are comparable across N as they are; its interval is the bootstrap sd of the
  full-set estimator.
- **Memorisation** (small datasets only): the fraction of generated samples whose nearest
  training image is closer than the ``MEMO_QUANTILE`` quantile of the held-out test
  images' nearest-training-image distances.  A generator drawing fresh images like the test
  split scores ``MEMO_QUANTILE`` (0.05); one that copies training images scores up to 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

BOOTSTRAP_DRAWS = 200
MATCHED_SUBSETS = 20
FD_INF_POINTS = 8
MEMO_QUANTILE = 0.05
Z95 = 1.959963984540054


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of features (N, D), float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b).  tr sqrt(cov_a cov_b) is
    the sum of the square roots of the eigenvalues of cov_a cov_b (real and >= 0 for PSD
    covariances): equal to scipy's sqrtm route to rounding, and several times faster."""
    eig = np.linalg.eigvals(cov_a @ cov_b).real
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def fd_infinity(features: np.ndarray, ref_stats: tuple[np.ndarray, np.ndarray], seed: int = 0) -> float:
    """FD extrapolated to infinitely many generated samples: FD of nested random subsets at
    ``FD_INF_POINTS`` sizes evenly spaced in 1/N between 1/(N/4) and 1/N, least-squares
    line in 1/N, value at 0."""
    n = len(features)
    order = np.random.default_rng(seed).permutation(n)
    inverse = np.linspace(4.0 / n, 1.0 / n, FD_INF_POINTS)
    sizes = np.unique(np.round(1.0 / inverse).astype(int).clip(2, n))
    fds = [frechet_from_stats(*gaussian_stats(features[order[:k]]), *ref_stats) for k in sizes]
    slope, intercept = np.polyfit(1.0 / sizes, fds, 1)
    return float(intercept)


def bootstrap_interval(stat: Callable[[np.ndarray], float], n: int, estimate: float, *,
                       draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> list[float]:
    """95% interval ``estimate +- 1.96 sd`` of ``stat(rows)`` over ``draws`` bootstrap
    resamples ``rows`` (indices into the ``n`` generated samples, drawn with replacement)."""
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, n)) for _ in range(draws)]
    sd = float(np.std(values, ddof=1)) if draws > 1 else math.nan
    return [estimate - Z95 * sd, estimate + Z95 * sd]


def matched_fd(features: np.ndarray, ref_stats: tuple[np.ndarray, np.ndarray], size: int,
               subsets: int = MATCHED_SUBSETS, seed: int = 0) -> float:
    """Mean FD of ``subsets`` random subsets of ``size`` rows of ``features`` (without
    replacement) against the reference statistics: FD at the sample count of a floor."""
    rng = np.random.default_rng(seed)
    size = min(size, len(features))
    return float(np.mean([frechet_from_stats(*gaussian_stats(features[rng.choice(len(features), size, replace=False)]),
                                             *ref_stats) for _ in range(subsets)]))


class KernelKID:
    """KID's unbiased MMD^2 with the kernel (x.y / D + 1)^3 on generated features (N, D)
    against a fixed reference (M, D), with the kernel matrices computed once so that a
    bootstrap resample costs an index gather."""

    def __init__(self, gen: np.ndarray, ref: np.ndarray) -> None:
        gen, ref = np.asarray(gen, np.float64), np.asarray(ref, np.float64)
        d, m = ref.shape[1], len(ref)
        k_rr = (ref @ ref.T / d + 1) ** 3
        self.ref_term = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
        self.k_gg = (gen @ gen.T / d + 1) ** 3
        self.k_gr = ((gen @ ref.T / d + 1) ** 3).mean(axis=1)  # each row's mean over the reference

    def __call__(self, rows: np.ndarray | None = None) -> float:
        k = self.k_gg if rows is None else self.k_gg[np.ix_(rows, rows)]
        cross = self.k_gr if rows is None else self.k_gr[rows]
        n = len(k)
        return float((k.sum() - np.trace(k)) / (n * (n - 1)) + self.ref_term - 2 * cross.mean())


def memorisation_rate(gen_pixels: np.ndarray, train_pixels: np.ndarray, test_pixels: np.ndarray,
                      quantile: float = MEMO_QUANTILE) -> tuple[float, float, list[float]]:
    """(rate, threshold, 95% Wilson interval): the fraction of generated images (N, P) whose
    nearest training image (M, P) is closer than the ``quantile`` of the held-out test
    images' (T, P) nearest-training distances (Euclidean, in pixel space)."""
    def nearest(a: np.ndarray) -> np.ndarray:
        a, t = np.asarray(a, np.float64), np.asarray(train_pixels, np.float64)
        sq = (a ** 2).sum(1)[:, None] + (t ** 2).sum(1)[None] - 2 * a @ t.T
        return np.sqrt(np.maximum(sq.min(axis=1), 0.0))

    threshold = float(np.quantile(nearest(test_pixels), quantile))
    hits = nearest(gen_pixels) < threshold
    return float(hits.mean()), threshold, wilson_interval(int(hits.sum()), len(hits))


def wilson_interval(successes: int, n: int) -> list[float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return [math.nan, math.nan]
    p, z2 = successes / n, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [centre - half, centre + half]
