"""FD / KID (and optionally precision/recall) of generated images against a real reference,
through torch-fidelity or clean-fid, with a pluggable feature network.

Features come from :mod:`benchmark.metrics.features` (quantisation, the two backends,
the feature networks of ``eval.extractor``); the reference's from
:mod:`benchmark.metrics.reference`.  FD and KID come from the backend's own code on
those features: torch-fidelity's ``fid_features_to_statistics`` /
``fid_statistics_to_metric`` (trace of the matrix square root from eigenvalues) and
``kid_features_to_metric``; clean-fid's ``fid_from_feats`` (``scipy.linalg.sqrtm``) and
``kernel_distance``.  On the same features the two FDs agree to ~1e-9 relative (tested at
1e-6); KIDs agree in expectation only: each library draws its own random subsets
(torch-fidelity: ``np.random.RandomState(seed)``; clean-fid: the global numpy RNG, which we
seed and restore around the call).

KID: cubic polynomial kernel ``(x.y / D + 1)^3``, unbiased, ``KID_SUBSETS`` subsets of
``min(1000, N, M)`` samples.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from torch import Tensor

from benchmark.data import Dataset
from benchmark.metrics.features import (  # noqa: F401 - re-exported: the suite's one import point
    BACKENDS,
    EXTRACTORS,
    Extractor,
    FidOptions,
    build_extractor,
    check_images,
    dataset_features,
    image_features,
    quantise,
    uint8_features,
)
from benchmark.metrics.reference import reference_batch, reference_features
from benchmark.schema import UserError

KID_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000


# ----------------------------------------------------------------------------------------
# FD and KID from features, each backend with its own code.


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray, backend: str) -> float:
    """Frechet distance between Gaussians fitted to (N, D) and (M, D) features."""
    a, b = np.asarray(features_a, dtype=np.float32), np.asarray(features_b, dtype=np.float32)
    if backend == "torch-fidelity":
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

        stats_a, stats_b = (fid_features_to_statistics(torch.from_numpy(f)) for f in (a, b))
        return float(fid_statistics_to_metric(stats_a, stats_b, False)[torch_fidelity.KEY_METRIC_FID])
    from cleanfid.fid import fid_from_feats

    with warnings.catch_warnings():
        # clean-fid 0.1.35 passes sqrtm(..., disp=False), deprecated in SciPy 1.17: noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(fid_from_feats(a, b))


def fid_to_statistics(features: np.ndarray, reference: dict[str, np.ndarray]) -> float:
    """Frechet distance between (N, D) features and reference statistics ``mu`` (D,),
    ``sigma`` (D, D) (an ADM batch's, made by ADM's suite in float64), by torch-fidelity's
    code, our statistics in float64 too (ADM's ``np.mean``/``np.cov`` of float32 features)."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    features = np.asarray(features, dtype=np.float64)
    ours = {"mu": features.mean(axis=0), "sigma": np.cov(features, rowvar=False)}
    if reference["mu"].shape != ours["mu"].shape:
        raise UserError(f"eval.reference holds {reference['mu'].shape[0]}-d statistics but the "
                        f"extractor gives {features.shape[1]}-d features; expected the extractor the "
                        f"statistics were made with (inception-v3: 2048-d)")
    theirs = {k: np.asarray(reference[k], dtype=np.float64) for k in ("mu", "sigma")}
    return float(fid_statistics_to_metric(ours, theirs, False)[torch_fidelity.KEY_METRIC_FID])


def kid_from_features(features_a: np.ndarray, features_b: np.ndarray, backend: str,
                      seed: int) -> dict[str, float]:
    """KID (unbiased MMD^2, cubic kernel) mean over subsets; ``kid_std`` where reported."""
    a, b = np.asarray(features_a, dtype=np.float32), np.asarray(features_b, dtype=np.float32)
    size = min(KID_MAX_SUBSET_SIZE, len(a), len(b))
    if backend == "torch-fidelity":
        from torch_fidelity.metric_kid import kid_features_to_metric

        out = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=KID_SUBSETS,
                                     kid_subset_size=size, rng_seed=seed, verbose=False)
        return {"kid": float(out[torch_fidelity.KEY_METRIC_KID_MEAN]),
                "kid_std": float(out[torch_fidelity.KEY_METRIC_KID_STD])}
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(seed % 2**32)  # clean-fid draws subsets from the global RNG
    try:
        kid = kernel_distance(a.astype(np.float64), b.astype(np.float64),
                              num_subsets=KID_SUBSETS, max_subset_size=size)
    finally:
        np.random.set_state(state)
    return {"kid": float(kid)}


# ----------------------------------------------------------------------------------------
# The suite.


def evaluate_fid(samples: Tensor, dataset: Dataset, *, options: FidOptions,
                 cache_dir: str | Path) -> dict[str, Any]:
    """FD, KID (and precision/recall if asked) of samples (N, *dataset.shape) against the
    dataset's reference split, in ``options.extractor``'s feature space.

    Latent samples are decoded by the dataset's decode hook first.  Returns the metrics
    ``fd``, ``kid`` (``kid_std`` with torch-fidelity), ``precision``, ``recall``,
    ``density``, ``coverage`` if asked, and ``reference``: what the samples were compared
    with (see :func:`benchmark.metrics.reference.reference_features`).  With an ADM
    reference batch (``options.reference``) FD is against its ``mu``/``sigma`` when it holds
    them, and KID / precision-recall against its ``arr_0`` images (absent without them).
    """
    check_images(samples, "samples")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = build_extractor(options, Path(cache_dir), device)
    real, stats, reference = reference_set(dataset, extractor, options, Path(cache_dir))
    fake = dataset_features(samples, dataset, extractor, options)
    metrics: dict[str, Any] = {"fd": fid_to_statistics(fake, stats) if stats is not None
                               else fid_from_features(fake, real, options.backend)}
    if real is not None:
        metrics.update(kid_from_features(fake, real, options.backend, options.seed))
    if options.precision_recall:
        from benchmark.metrics.prdc import precision_recall

        metrics.update(precision_recall(real, fake, seed=options.seed))
    return {**metrics, "reference": reference}


def reference_set(dataset: Dataset, extractor: Extractor, options: FidOptions, cache_dir: Path
                  ) -> tuple[np.ndarray | None, dict[str, np.ndarray] | None, dict[str, Any]]:
    """What samples are compared with: (reference features or None, reference statistics or
    None, its record): an ADM batch when ``options.reference`` names one, else the split."""
    if options.reference:
        return reference_batch(extractor, options, cache_dir)
    features, info = reference_features(dataset, extractor, options, cache_dir)
    return features, None, info
