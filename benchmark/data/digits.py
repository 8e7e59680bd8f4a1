"""scikit-learn's handwritten digits: 1797 images of 8x8 pixels, 10 classes, no download.

Pixels are integers 0..16 in the source; we map them to ``x / 8 - 1`` so the data lies
exactly on the grid ``{-1, -7/8, ..., 1}``.  The train/test split is stratified and fixed
(``train_test_split(..., stratify=y, random_state=split_seed)``), 1500 / 297 by default.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmark.data.base import Dataset, fingerprint_dataset

DIGITS_SHAPE = (1, 8, 8)
DIGITS_NUM_CLASSES = 10
DIGITS_TOTAL = 1797
DIGITS_RECIPE_VERSION = 1  # bump when the scaling or the split procedure changes


def load_digits(test_size: int = 297, split_seed: int = 0) -> Dataset:
    """The digits dataset, images (N, 1, 8, 8) float32 in [-1, 1], labels (N,) in 0..9.

    Args:
        test_size: number of held-out images (the rest, 1797 - test_size, is the train set).
        split_seed: ``random_state`` of the stratified split.
    """
    if not isinstance(test_size, int) or not 10 <= test_size <= DIGITS_TOTAL - 10:
        raise ValueError(
            f"digits test_size={test_size!r} is out of range; expected an int in "
            f"[10, {DIGITS_TOTAL - 10}] so both splits hold every class (default 297)"
        )
    from sklearn.datasets import load_digits as sklearn_load_digits  # slow import: only here
    from sklearn.model_selection import train_test_split

    bunch = sklearn_load_digits()
    images = bunch.images.astype(np.float32) / 8.0 - 1.0
    labels = bunch.target.astype(np.int64)
    train_i, test_i = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=split_seed
    )
    # Sorted indices keep the original sklearn order inside each split (stable, readable).
    train_i, test_i = np.sort(train_i), np.sort(test_i)
    train_x, train_y = _as_tensors(images, labels, train_i)
    test_x, test_y = _as_tensors(images, labels, test_i)
    recipe = {
        "name": "digits",
        "version": DIGITS_RECIPE_VERSION,
        "test_size": test_size,
        "split_seed": split_seed,
        "scaling": "x/8-1",
    }
    return Dataset(
        name="digits",
        shape=DIGITS_SHAPE,
        num_classes=DIGITS_NUM_CLASSES,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        fingerprint=fingerprint_dataset(recipe, train_x, train_y, test_x, test_y),
        exact_sampler=None,
        params={"recipe": recipe, "range": [-1.0, 1.0]},
    )


def _as_tensors(
    images: np.ndarray, labels: np.ndarray, index: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``index`` of images (M, 8, 8) and labels (M,) -> float32 (n, 1, 8, 8), long (n,)."""
    x = torch.from_numpy(np.ascontiguousarray(images[index])).unsqueeze(1).contiguous()
    return x, torch.from_numpy(np.ascontiguousarray(labels[index]))
