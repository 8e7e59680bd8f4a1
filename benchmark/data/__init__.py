"""Datasets: one small interface for the embedded digits and the exact 2-D / 1-D toys.

Every dataset is a :class:`Dataset` built by a registered factory::

    ds = load_dataset("digits")                 # ds.train_x: (1500, 1, 8, 8) in [-1, 1]
    ds = load_dataset("gaussian1d", mean=0.5)   # ds.exact_sampler(n, gen): (n, 1)

Labels follow the suite convention: classes ``0..K-1`` and the null label ``K``.
Unconditional data has ``num_classes = 0``, so every label is 0, the null label.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["DATASETS", "Dataset", "fingerprint_dataset", "load_dataset"]

from benchmark.data.base import Dataset, fingerprint_dataset


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


from benchmark.data.digits import load_digits  # noqa: E402
from benchmark.data.imagefolder import load_imagefolder  # noqa: E402
from benchmark.data.latents import load_latents  # noqa: E402
from benchmark.data.torchvision_sets import load_cifar10, load_mnist  # noqa: E402
from benchmark.data.toys import TOY_FACTORIES  # noqa: E402

DATASETS: dict[str, Callable[..., Dataset]] = {"digits": load_digits, **TOY_FACTORIES}
# Read from data.root (benchmark.catalog.DATA_LAYOUTS); torchvision is imported on first use.
DATASETS.update(mnist=load_mnist, cifar10=load_cifar10, imagefolder=load_imagefolder,
                latents=load_latents)
