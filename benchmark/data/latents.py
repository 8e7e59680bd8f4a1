"""Precomputed latents (for example SD-VAE latents of ImageNet) stored as ``.npz`` shards.

Layout under ``data.root``::

    train-00000.npz, train-00001.npz, ...   each: latents (N_i, C, H, W) float16/float32
                                                  labels  (N_i,) integer class ids 0..K-1
                                                  scale_factor  () float, optional
    test-00000.npz, ...                     optional held-out split, same arrays

Why ``.npz``: one self-describing file per shard holds the latents and their labels
together, numpy writes it (``np.savez(path, latents=..., labels=...)``) with no extra
dependency, and it loads with ``allow_pickle=False`` (no code in a data file).  Shards are
read in sorted name order and concatenated; the model trains on ``latents * scale``.
``data.options.scale=auto`` (the default) takes the ``scale_factor`` the shards record
(``python -m benchmark.encode`` writes the VAE's, 0.18215 for SD-VAE, beside unscaled
latents), or 1 for shards that record none; a number overrides it.

Decode hook: evaluation turns samples back into images with the decoder named by
``data.options.decoder`` before any feature network sees them (``decode_latents``), after
dividing the scale back out.  Built in: ``"none"`` (identity: the metrics then read the
latents themselves, clipped to [-1, 1] like images; a smoke test, not a published number)
and ``"sd-vae"`` (diffusers' ``AutoencoderKL`` from the local weights at
``data.options.vae``, :mod:`benchmark.data.vae`).  Another decoder, a function
``latents (N, C, H, W) -> images (N, 3, H', W') in [-1, 1]``, is added with
:func:`register_decoder`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmark.catalog import check_data_root, data_root_error
from benchmark.data.base import Dataset, fingerprint_dataset
from benchmark.data.vae import sd_vae_decoder
from benchmark.schema import UserError
from benchmark.vae_weights import VAE_DECODERS

RECIPE_VERSION = 2  # bump when the shard reading or the scaling changes (2: scale=auto)

Decoder = Callable[[Tensor], Tensor]
"""latents (N, C, H, W), unscaled (as stored) -> images (N, C', H', W') in [-1, 1]."""

DecoderFactory = Callable[[str], Decoder]
"""``data.options.vae`` (a path, "" when unused) -> the decoder."""


def _identity_decoder(latents: Tensor) -> Tensor:
    return latents


DECODERS: dict[str, DecoderFactory] = {"none": lambda vae: _identity_decoder, "sd-vae": sd_vae_decoder}


def register_decoder(name: str, decoder: Decoder) -> None:
    """Make ``data.options.decoder=<name>`` decode latents with ``decoder`` for evaluation."""
    DECODERS[name] = lambda vae: decoder


def load_latents(root: str = "", scale: float | str = "auto", num_classes: int = 0,
                 decoder: str = "none", vae: str = "") -> Dataset:
    """Latent shards -> a Dataset of (N, C, H, W) float32 ``latents * scale`` and labels (N,).

    Args:
        scale: multiplies the stored latents for training (decoding divides it back out);
            ``"auto"``: the ``scale_factor`` recorded in the shards, 1 if none is.
        num_classes: K; 0 takes ``max(label) + 1`` over every split.
        decoder: a name in :data:`DECODERS` used at evaluation.
        vae: the autoencoder's folder or file for ``decoder=sd-vae`` (read at evaluation).
    """
    if decoder not in DECODERS:
        raise UserError(f"data.options.decoder={decoder!r} is not registered; expected one of: "
                        f"{', '.join(DECODERS)} (register_decoder in benchmark/data/latents.py)")
    if scale != "auto" and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise UserError(f"data.options.scale={scale!r} is invalid; expected auto (the factor the "
                        "shards record) or a positive number (0.18215 for SD-VAE latents stored "
                        "unscaled, 1 if already scaled)")
    base = check_data_root("latents", root)
    train_x, train_y, recorded = _read_split(base, root, "train")
    test_x, test_y, test_recorded = (_read_split(base, root, "test") if any(base.glob("test-*.npz"))
                                     else (None, None, recorded))
    if test_x is not None and test_x.shape[1:] != train_x.shape[1:]:
        raise UserError(data_root_error("latents", root, f"holds test latents of shape "
                                        f"{tuple(test_x.shape[1:])} but train latents of shape "
                                        f"{tuple(train_x.shape[1:])}; expected one shape"))
    if test_recorded != recorded:
        raise UserError(data_root_error("latents", root, f"holds train shards with scale_factor "
                                        f"{recorded} but test shards with {test_recorded}; expected one"))
    if scale == "auto":
        if recorded is None and decoder in VAE_DECODERS:
            raise UserError(data_root_error("latents", root, "records no scale_factor, so "
                                            "data.options.scale=auto cannot know it; expected "
                                            "data.options.scale=0.18215 for SD-VAE latents stored "
                                            "unscaled (1 if stored already scaled)"))
        scale = 1.0 if recorded is None else recorded
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
        params={"recipe": recipe, "root": str(base), "decoder": decoder, "scale": float(scale),
                "vae": vae},
    )


def decode_latents(dataset: Dataset, latents: Tensor) -> Tensor:
    """The decode hook: training-space latents (N, C, H, W) -> images in [-1, 1] for metrics.

    Datasets that are not latents come back unchanged.
    """
    name = dataset.params.get("decoder")
    if name is None:
        return latents
    decoder = DECODERS[name](dataset.params.get("vae", ""))  # sd-vae loads its model once per process
    return decoder(latents / dataset.params["scale"])


def _read_split(base: Path, root: str, split: str) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Concatenate ``<split>-*.npz`` shards in name order -> latents (N, C, H, W), labels (N,)
    and the scale factor they record (None if none does; every shard must agree)."""
    parts_x, parts_y, factors = [], [], set()
    for path in sorted(base.glob(f"{split}-*.npz")):
        x, y, factor = _read_shard(path, root)
        factors.add(factor)
        if len(factors) > 1:
            raise UserError(data_root_error("latents", root, f"holds {path.name} with scale_factor "
                                            f"{factor} after shards with {sorted(factors - {factor}, key=str)[0]}; "
                                            f"expected every shard encoded alike"))
        if parts_x and x.shape[1:] != parts_x[0].shape[1:]:
            raise UserError(data_root_error("latents", root, f"holds {path.name} with latents of "
                                            f"shape {x.shape[1:]} after shards of {parts_x[0].shape[1:]}; "
                                            f"expected one shape"))
        parts_x.append(x)
        parts_y.append(y)
    if not sum(len(y) for y in parts_y):
        raise UserError(data_root_error("latents", root, f"holds no {split} latents (every "
                                        f"{split}-*.npz shard is empty)"))
    return np.concatenate(parts_x), np.concatenate(parts_y), factors.pop()


def _read_shard(path: Path, root: str) -> tuple[np.ndarray, np.ndarray, float | None]:
    bad = lambda problem: UserError(data_root_error("latents", root, f"holds {path.name}, {problem}"))  # noqa: E731
    try:
        with np.load(path, allow_pickle=False) as shard:
            arrays = {key: shard[key] for key in ("latents", "labels", "scale_factor") if key in shard.files}
    except Exception as err:  # not a zip, truncated, object arrays (pickles are refused)
        raise bad(f"which is not a readable .npz ({type(err).__name__})") from None
    if not {"latents", "labels"} <= set(arrays):
        raise bad(f"which lacks {' and '.join(sorted({'latents', 'labels'} - set(arrays)))}")
    factor = arrays.get("scale_factor")
    if factor is not None and (factor.shape != () or not np.isfinite(factor) or not factor > 0):
        raise bad(f"whose scale_factor is {factor!r}, not one positive number")
    x, y = arrays["latents"], arrays["labels"]
    if x.ndim != 4 or x.shape[2] != x.shape[3] or not np.issubdtype(x.dtype, np.floating):
        raise bad(f"whose latents are {x.dtype} {x.shape}, not float (N, C, H, H)")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise bad(f"whose labels are {y.dtype} {y.shape}, not {len(x)} integers >= 0")
    if not np.isfinite(x).all():
        raise bad("whose latents hold NaN or inf")
    return x, y, None if factor is None else float(factor)
