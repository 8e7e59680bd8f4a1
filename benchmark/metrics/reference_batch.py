"""Reference batches in the ADM evaluation suite's format, checked without loading them.
Torch-free (the planner checks the file before anything trains).

openai/guided-diffusion's ``evaluations/evaluator.py`` compares samples with a *reference
batch*, an ``.npz`` such as ``VIRTUAL_imagenet256_labeled.npz``, holding

    mu        float64 (2048,)          mean of the Inception pool features of the reference set
    sigma     float64 (2048, 2048)     their covariance
    arr_0     uint8 (N, H, W, 3)       reference images (NHWC), 10,000 for ImageNet-256
    arr_1     int (N,)                 their labels (the "labeled" batches; not used here)

(also ``mu_s``/``sigma_s``, spatial features for sFID, not used here).  ADM's FID takes the
statistics when the file has them, so ImageNet-256 FIDs in DiT/SiT/MeanFlow/iMF papers are
against the statistics of the whole training set, not of the 10,000 images; we do the same:
FD from ``mu``/``sigma`` when present, else from the features of ``arr_0``; KID and
precision/recall always need ``arr_0`` (features computed here, cached like any reference).

``eval.reference=<file>`` selects such a batch instead of the dataset's own split.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmark.schema import UserError

ADM_REF_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/"
               "256/VIRTUAL_imagenet256_labeled.npz")
INCEPTION_DIM = 2048


@dataclass(frozen=True)
class ReferenceBatch:
    path: Path
    stats_dim: int | None                          # D of mu (D,) / sigma (D, D), None without them
    images: tuple[int, int, int, int] | None       # arr_0's (N, H, W, 3), None without it


def _headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array name: (shape, dtype)} of an .npz, read from each member's header only."""
    out = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not name.endswith(".npy"):
                continue
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(member) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(member))
            out[name[:-4]] = (shape, dtype)
    return out


def _bad(configured: str, problem: str) -> UserError:
    return UserError(f"eval.reference={configured!r} {problem}; expected an ADM reference batch .npz "
                     f"with mu (D,) and sigma (D, D) float statistics and/or arr_0 uint8 images "
                     f"(N, H, W, 3), e.g. {ADM_REF_URL} (download it on a machine with internet)")


def locate_reference_batch(configured: str) -> ReferenceBatch:
    """Check the file's arrays (names, shapes, dtypes); UserError (one line) when unusable."""
    path = Path(configured).expanduser()
    if not path.is_file():
        raise _bad(configured, "does not exist" if not path.exists() else "is not a file")
    try:
        arrays = _headers(path)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise _bad(configured, f"is not a readable .npz ({type(err).__name__})") from None
    stats_dim = images = None
    if "mu" in arrays or "sigma" in arrays:
        (mu, mu_type), (sigma, sigma_type) = arrays.get("mu", ((), None)), arrays.get("sigma", ((), None))
        if (len(mu) != 1 or sigma != (mu[0], mu[0]) or mu_type.kind != "f" or sigma_type.kind != "f"):
            raise _bad(configured, f"holds mu {mu} and sigma {sigma}, not float (D,) and (D, D)")
        stats_dim = mu[0]
    if "arr_0" in arrays:
        shape, dtype = arrays["arr_0"]
        if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8 or shape[0] < 2:
            raise _bad(configured, f"holds arr_0 {dtype} {shape}, not uint8 (N >= 2, H, W, 3) images")
        images = tuple(shape)
    if stats_dim is None and images is None:
        raise _bad(configured, f"holds neither mu/sigma nor arr_0 (arrays: {', '.join(sorted(arrays)) or 'none'})")
    return ReferenceBatch(path.resolve(), stats_dim, images)


def check_reference_batch(configured: str, extractor: str, backend: str, precision_recall: bool) -> str:
    """The batch's identity (sha256 of the file, 16 hex) for evaluation keys, after checking
    that the evaluation asked for can use it."""
    from benchmark.metrics.inception import file_digest

    batch = locate_reference_batch(configured)
    if batch.stats_dim is not None:
        if extractor == "inception-v3" and batch.stats_dim != INCEPTION_DIM:
            raise _bad(configured, f"holds {batch.stats_dim}-d statistics but eval.extractor=inception-v3 "
                                   f"gives {INCEPTION_DIM}-d features")
        if backend != "torch-fidelity" and extractor == "inception-v3":
            raise UserError(f"eval.reference={configured!r} holds Inception statistics made with the "
                            f"TensorFlow FID network (ADM's suite), which torch-fidelity's inception-v3-compat "
                            f"reproduces; expected eval.backend=torch-fidelity (clean-fid resizes differently)")
    if batch.images is None and precision_recall:
        raise UserError(f"eval.reference={configured!r} holds statistics only (no arr_0 images), so "
                        f"precision/recall cannot be computed; expected eval.precision_recall=false or a "
                        f"batch with arr_0")
    return file_digest(batch.path)[:16]
