"""The dataset interface every loader returns, and the fingerprint that keys it (the
layer under every loader in this package and under the registry in ``__init__``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


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
