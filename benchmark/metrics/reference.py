"""Reference features of the real data: computed once, cached on disk, named in records.

The features of a dataset's real split depend on (dataset fingerprint, split, feature
network and its weights, backend -- resizing differs --, resolution, which images).  They
are computed once per such tuple and written atomically (temp file, rename) to::

    <results_dir>/cache/reference/<data>-<split>-<extractor>-<backend>-<key>.npz
    <results_dir>/cache/reference/adm-<sha256>-<extractor>-<backend>-<key>.npz   (ADM batch)
        features  float32 (N, D)      the reference features (FD statistics, KID, PR)
        meta      str (JSON)          the identity below, for a human reading the cache

``key`` is 16 hex characters of sha256 over that identity, so a new dataset version, other
weights or another backend never reuse stale features.  Files load with
``allow_pickle=False``; an unreadable one is recomputed with a warning.

A split larger than ``eval.num_reference`` is subsampled once, by a fixed seed (0), never by
the evaluation seed, so every evaluation of a dataset shares one reference.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmark.data import Dataset
from benchmark.metrics.features import dataset_features, uint8_features
from benchmark.schema import UserError
from benchmark.store import atomic_write_bytes

REFERENCE_VERSION = 1       # bump when the identity or the subset rule changes
REFERENCE_SUBSET_SEED = 0   # picks the subset of a split larger than num_reference


def reference_split(dataset: Dataset, split: str) -> Tensor:
    """The real images (N, *shape) of ``split`` ("train" or "test"); UserError if absent."""
    images = {"train": dataset.train_x, "test": dataset.test_x}.get(split)
    if images is None:
        raise UserError(f"eval.reference_split={split!r} but data={dataset.name} has no {split} "
                        "split; expected eval.reference_split=train")
    return images


def reference_subset(count: int, limit: int) -> Tensor:
    """Indices (min(count, limit),) in increasing order: all rows, or a fixed random subset."""
    if count <= limit:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(REFERENCE_SUBSET_SEED)
    return torch.randperm(count, generator=generator)[:limit].sort().values


def reference_identity(dataset: Dataset, extractor: Any, options: Any, count: int,
                       resolution: tuple[int, ...]) -> dict[str, Any]:
    """Everything the reference features depend on (hashed into the cache file name)."""
    return {"version": REFERENCE_VERSION, "dataset": dataset.name, "fingerprint": dataset.fingerprint,
            "split": options.reference_split, "extractor": extractor.identity(),
            "backend": options.backend, "resolution": list(resolution), "images": count,
            "subset_seed": REFERENCE_SUBSET_SEED}


def reference_features(dataset: Dataset, extractor: Any, options: Any,
                       cache_dir: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Features (N, D) of the reference images and the record of what they are.

    ``extractor`` and ``options`` are :class:`benchmark.metrics.features.Extractor` and
    :class:`~benchmark.metrics.features.FidOptions`.  The returned dict (for the evaluation
    record) holds the identity, ``of`` (the split's size), ``cache`` (the file, relative to
    ``cache_dir``), ``cached`` (reused or computed now) and ``seconds`` spent computing.
    """
    from benchmark.data.latents import decode_latents

    images = reference_split(dataset, options.reference_split)
    index = reference_subset(len(images), options.num_reference)
    with torch.no_grad():
        resolution = tuple(decode_latents(dataset, images[:1]).shape[1:])
    identity = reference_identity(dataset, extractor, options, len(index), resolution)
    stem = f"{dataset.name}-{options.reference_split}-{extractor.name}-{options.backend}"
    features, info = cached_features(Path(cache_dir), stem, identity,
                                     lambda: dataset_features(images[index], dataset, extractor, options))
    return features, {**identity, "of": len(images), **info}


def reference_batch(extractor: Any, options: Any, cache_dir: Path
                    ) -> tuple[np.ndarray | None, dict[str, np.ndarray] | None, dict[str, Any]]:
    """An ADM reference batch (``options.reference``, :mod:`benchmark.metrics.reference_batch`):
    (features (N, D) of its ``arr_0`` images or None, its ``mu``/``sigma`` as float64 or None,
    the record of what it is).  The images' features are cached like a split's."""
    from benchmark.metrics.inception import file_digest
    from benchmark.metrics.reference_batch import locate_reference_batch

    batch = locate_reference_batch(options.reference)
    digest = file_digest(batch.path)[:16]
    info: dict[str, Any] = {"version": REFERENCE_VERSION, "dataset": "adm-reference-batch",
                            "file": str(batch.path), "sha256": digest, "extractor": extractor.identity(),
                            "backend": options.backend, "fd_from": "arr_0", "cached": True, "seconds": 0.0}
    stats = None
    with np.load(batch.path, allow_pickle=False) as arrays:
        if batch.stats_dim is not None:
            stats = {"mu": np.asarray(arrays["mu"], np.float64), "sigma": np.asarray(arrays["sigma"], np.float64)}
            info["fd_from"] = "mu/sigma"
        features = None
        if batch.images is not None:
            n, h, w, c = batch.images
            info.update(images=n, of=n, resolution=[c, h, w])
            identity = {k: info[k] for k in ("version", "dataset", "sha256", "extractor", "backend")}
            features, cache = cached_features(
                Path(cache_dir), f"adm-{digest}-{extractor.name}-{options.backend}", identity,
                lambda: uint8_features(torch.from_numpy(arrays["arr_0"]).permute(0, 3, 1, 2), extractor, options))
            info.update(cache)
    return features, stats, info


def cached_features(cache_dir: Path, stem: str, identity: dict[str, Any],
                    compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:
    """Features from ``<cache_dir>/reference/<stem>-<key>.npz``, or ``compute()`` written there
    atomically; key = 16 hex of sha256 over ``identity``.  Returns the features and
    ``{"cache": relative path, "cached": reused?, "seconds": spent computing}``."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / "reference" / f"{stem}-{key}.npz"
    info = {"cache": str(path.relative_to(cache_dir))}
    features = _load(path)
    if features is not None:
        return features, {**info, "cached": True, "seconds": 0.0}
    tick = time.perf_counter()
    features = compute()
    seconds = time.perf_counter() - tick
    buffer = io.BytesIO()
    np.savez(buffer, features=features, meta=np.array(json.dumps(identity, sort_keys=True)))
    atomic_write_bytes(path, buffer.getvalue())
    return features, {**info, "cached": False, "seconds": seconds}


def _load(path: Path) -> np.ndarray | None:
    """The cached features, or None when absent or unreadable (then recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            return np.asarray(cached["features"], dtype=np.float32)
    except Exception as err:  # torn by hand, truncated, not an npz
        warnings.warn(f"reference cache {path} is unreadable ({type(err).__name__}); recomputing "
                      "and overwriting it", RuntimeWarning, stacklevel=3)
        return None
