"""Precomputed latents (for example SD-VAE latents of ImageNet) stored as ``.npz`` shards.

Layout under ``data.root``::

    train-00000.npz, train-00001.npz, ...   each: latents (N_i, C, H, W) float16/float32
                                                  labels  (N_i,) integer class ids 0..K-1
    test-00000.npz, ...                     optional held-out split, same arrays

Why ``.npz``: one self-describing file per shard holds the latents and their labels
together, numpy writes it (``np.savez(path, latents=..., labels=...)``) with no extra
dependency, and it loads with ``allow_pickle=False`` (no code in a data file).  Shards are
read in sorted name order and concatenated; the model trains on ``latents * scale``
(``data.options.scale``, e.g. 0.18215 for SD-VAE latents stored unscaled).

Decode hook: evaluation turns samples back into images with the decoder named by
``data.options.decoder`` before any feature network sees them (``decode_latents``).  The
registry holds ``"none"`` (identity: the metrics then read the latents themselves, clipped
to [-1, 1] like images; useful for a smoke test, not a published number).  A real decoder
(an SD-VAE) is a function ``latents (N, C, H, W) -> images (N, 3, 8H, 8W) in [-1, 1]``
registered with :func:`register_decoder`; docs/metrics.md shows one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmark.catalog import check_data_root, data_root_error
from benchmark.data import Dataset, fingerprint_dataset
from benchmark.schema import UserError

RECIPE_VERSION = 1  # bump when the shard reading or the scaling changes

Decoder = Callable[[Tensor], Tensor]
"""latents (N, C, H, W), unscaled (as stored) -> images (N, C', H', W') in [-1, 1]."""

DECODERS: dict[str, Decoder] = {"none": lambda latents: latents}


def register_decoder(name: str, decoder: Decoder) -> None:
    """Make ``data.options.decoder=<name>`` decode latents with ``decoder`` for evaluation."""
    DECODERS[name] = decoder


def load_latents(root: str = "", scale: float = 1.0, num_classes: int = 0,
                 decoder: str = "none") -> Dataset:
    """Latent shards -> a Dataset of (N, C, H, W) float32 ``latents * scale`` and labels (N,).

    Args:
        scale: multiplies the stored latents for training (decoding divides it back out).
        num_classes: K; 0 takes ``max(label) + 1`` over every split.
        decoder: a name in :data:`DECODERS` used at evaluation.
    """
    if decoder not in DECODERS:
        raise UserError(f"data.options.decoder={decoder!r} is not registered; expected one of: "
                        f"{', '.join(DECODERS)} (register_decoder in benchmark/data/latents.py)")
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise UserError(f"data.options.scale={scale!r} is invalid; expected a positive number "
                        "(0.18215 for SD-VAE latents stored unscaled, 1 if already scaled)")
    base = check_data_root("latents", root)
    train_x, train_y = _read_split(base, root, "train")
    test_x, test_y = _read_split(base, root, "test") if any(base.glob("test-*.npz")) else (None, None)
    if test_x is not None and test_x.shape[1:] != train_x.shape[1:]:
        raise UserError(data_root_error("latents", root, f"holds test latents of shape "
                                        f"{tuple(test_x.shape[1:])} but train latents of shape "
                                        f"{tuple(train_x.shape[1:])}; expected one shape"))
    top = int(max(train_y.max(), test_y.max() if test_y is not None else 0)) + 1
    if num_classes and top > num_classes:
        raise UserError(data_root_error("latents", root, f"holds label {top - 1} but "
                                        f"data.options.num_classes={num_classes}; expected labels "
                                        f"0..{num_classes - 1}"))
    recipe = {"name": "latents", "version": RECIPE_VERSION, "scale": float(scale),
              "decoder": decoder, "num_classes": num_classes or top}
    as_scaled = lambda x: None if x is None else torch.from_numpy(x.astype(np.float32) * np.float32(scale))  # noqa: E731
    as_long = lambda y: None if y is None else torch.from_numpy(y.astype(np.int64))  # noqa: E731
    tensors = [as_scaled(train_x), as_long(train_y), as_scaled(test_x), as_long(test_y)]
    return Dataset(
        name="latents",
        shape=tuple(train_x.shape[1:]),
        num_classes=num_classes or top,
        train_x=tensors[0], train_y=tensors[1], test_x=tensors[2], test_y=tensors[3],
        fingerprint=fingerprint_dataset(recipe, *tensors),
        params={"recipe": recipe, "root": str(base), "decoder": decoder, "scale": float(scale)},
    )


def decode_latents(dataset: Dataset, latents: Tensor) -> Tensor:
    """The decode hook: training-space latents (N, C, H, W) -> images in [-1, 1] for metrics.

    Datasets that are not latents come back unchanged.
    """
    name = dataset.params.get("decoder")
    if name is None:
        return latents
    return DECODERS[name](latents / dataset.params["scale"])


def _read_split(base: Path, root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``<split>-*.npz`` shards in name order -> latents (N, C, H, W), labels (N,)."""
    parts_x, parts_y = [], []
    for path in sorted(base.glob(f"{split}-*.npz")):
        x, y = _read_shard(path, root)
        if parts_x and x.shape[1:] != parts_x[0].shape[1:]:
            raise UserError(data_root_error("latents", root, f"holds {path.name} with latents of "
                                            f"shape {x.shape[1:]} after shards of {parts_x[0].shape[1:]}; "
                                            f"expected one shape"))
        parts_x.append(x)
        parts_y.append(y)
    if not sum(len(y) for y in parts_y):
        raise UserError(data_root_error("latents", root, f"holds no {split} latents (every "
                                        f"{split}-*.npz shard is empty)"))
    return np.concatenate(parts_x), np.concatenate(parts_y)


def _read_shard(path: Path, root: str) -> tuple[np.ndarray, np.ndarray]:
    bad = lambda problem: UserError(data_root_error("latents", root, f"holds {path.name}, {problem}"))  # noqa: E731
    try:
        with np.load(path, allow_pickle=False) as shard:
            arrays = {key: shard[key] for key in ("latents", "labels") if key in shard.files}
    except Exception as err:  # not a zip, truncated, object arrays (pickles are refused)
        raise bad(f"which is not a readable .npz ({type(err).__name__})") from None
    if set(arrays) != {"latents", "labels"}:
        raise bad(f"which lacks {' and '.join(sorted({'latents', 'labels'} - set(arrays)))}")
    x, y = arrays["latents"], arrays["labels"]
    if x.ndim != 4 or x.shape[2] != x.shape[3] or not np.issubdtype(x.dtype, np.floating):
        raise bad(f"whose latents are {x.dtype} {x.shape}, not float (N, C, H, H)")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise bad(f"whose labels are {y.dtype} {y.shape}, not {len(x)} integers >= 0")
    if not np.isfinite(x).all():
        raise bad("whose latents hold NaN or inf")
    return x, y
