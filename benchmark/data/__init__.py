"""Datasets: one small interface for the embedded digits and the exact 2-D / 1-D toys.

Every dataset is a :class:`Dataset` built by a registered factory::

    ds = load_dataset("digits")                 # ds.train_x: (1500, 1, 8, 8) in [-1, 1]
    ds = load_dataset("gaussian1d", mean=0.5)   # ds.exact_sampler(n, gen): (n, 1)

Labels follow the suite convention: classes ``0..K-1`` and the null label ``K``.
Unconditional data has ``num_classes = 0``, so every label is 0, the null label.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["DATASETS", "Dataset", "fingerprint_dataset", "load_dataset"]

from benchmark.catalog import check_data_options
from benchmark.data.base import Dataset, fingerprint_dataset
from benchmark.schema import UserError


def load_dataset(name: str, **options: Any) -> Dataset:
    """Build the dataset registered as ``name`` with the given factory options.

    Raises :class:`~benchmark.schema.UserError` (one line, exit 2 at a command line) naming
    the bad value and the accepted ones for an unknown dataset name, an option the factory
    does not take (``benchmark.catalog`` declares them, so the planner refuses these before
    anything runs), or an option value the factory refuses.
    """
    check_data_options(name, options)
    try:
        return DATASETS[name](**options)
    except ValueError as err:  # a factory's own check of an option's value
        raise UserError(f"data={name} data.options: {err}") from None


from benchmark.data.digits import load_digits  # noqa: E402
from benchmark.data.imagefolder import load_imagefolder  # noqa: E402
from benchmark.data.latents import load_latents  # noqa: E402
from benchmark.data.torchvision_sets import load_cifar10, load_mnist  # noqa: E402
from benchmark.data.toys import TOY_FACTORIES  # noqa: E402

DATASETS: dict[str, Callable[..., Dataset]] = {"digits": load_digits, **TOY_FACTORIES}
# Read from data.root (benchmark.catalog.DATA_LAYOUTS); torchvision is imported on first use.
DATASETS.update(mnist=load_mnist, cifar10=load_cifar10, imagefolder=load_imagefolder,
                latents=load_latents)
