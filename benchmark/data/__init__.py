"""Datasets: one small interface for the embedded digits and the exact 2-D / 1-D toys.

Every dataset is a :class:`Dataset` built by a registered factory::

    ds = load_dataset("digits")                 # ds.train_x: (1500, 1, 8, 8) in [-1, 1]
    ds = load_dataset("gaussian1d", mean=0.5)   # ds.exact_sampler(n, gen): (n, 1)

Labels follow the suite convention: classes ``0..K-1`` and the null label ``K``.
Unconditional data has ``num_classes = 0``, so every label is 0, the null label.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["DATASETS", "Dataset", "fingerprint_dataset", "load_dataset"]


@dataclass
class Dataset:
    """A fixed training set (and test split where one exists) plus its identity.

    Attributes:
        name: registry name, e.g. ``"digits"``.
        shape: per-sample shape, e.g. ``(1, 8, 8)`` or ``(2,)``.
        num_classes: K for class-conditional data, 0 for unconditional data.
        train_x: float32 (N, *shape).  train_y: long (N,), in ``0..K-1`` (all 0 if K = 0).
        test_x, test_y: the held-out split, or None (toys use ``exact_sampler`` instead).
        fingerprint: 16 hex characters of sha256 over the recipe and the exact tensors;
            it salts every cache key that depends on the data.
        exact_sampler: ``(n, generator) -> float32 (n, *shape)`` fresh exact samples, or None.
        params: analytic facts about the distribution where known (``mean``, ``std`` per
            coordinate as lists of floats) and the recipe that built it.
    """

    name: str
    shape: tuple[int, ...]
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    fingerprint: str
    exact_sampler: Callable[[int, torch.Generator], torch.Tensor] | None = None
    params: dict[str, Any] = field(default_factory=dict)


def fingerprint_dataset(recipe: dict[str, Any], *tensors: torch.Tensor | None) -> str:
    """Short sha256 of a JSON recipe and the exact bytes (and shapes, dtypes) of the tensors.

    Returns 16 hex characters.  ``None`` tensors are hashed as a marker, so a missing test
    split differs from an empty one.
    """
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for tensor in tensors:
        if tensor is None:
            digest.update(b"<none>")
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def load_dataset(name: str, **options: Any) -> Dataset:
    """Build the dataset registered as ``name`` with the given factory options.

    Raises ``ValueError`` naming the bad value and the accepted ones for an unknown
    dataset name or an option the factory does not take.
    """
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; expected one of: {', '.join(sorted(DATASETS))}"
        )
    factory = DATASETS[name]
    accepted = [p for p in inspect.signature(factory).parameters if p != "name"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"dataset {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"expected any of: {', '.join(accepted) or '(none)'}"
        )
    return factory(**options)


# The registry is filled after Dataset exists because the factories import it from here.
from benchmark.data.digits import load_digits  # noqa: E402
from benchmark.data.imagefolder import load_imagefolder  # noqa: E402
from benchmark.data.latents import load_latents  # noqa: E402
from benchmark.data.torchvision_sets import load_cifar10, load_mnist  # noqa: E402
from benchmark.data.toys import TOY_FACTORIES  # noqa: E402

DATASETS: dict[str, Callable[..., Dataset]] = {"digits": load_digits, **TOY_FACTORIES}
# Read from data.root (benchmark.catalog.DATA_LAYOUTS); torchvision is imported on first use.
DATASETS.update(mnist=load_mnist, cifar10=load_cifar10, imagefolder=load_imagefolder,
                latents=load_latents)
