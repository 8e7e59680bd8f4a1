"""MNIST and CIFAR-10 from a local folder in torchvision's on-disk formats.

The files are read by ``torchvision.datasets`` itself, so a folder torchvision made (or
one a cluster keeps) works as is::

    <root>/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta   python pickles
    <root>/MNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte,     idx files,
                     t10k-images-idx3-ubyte,  t10k-labels-idx1-ubyte       uncompressed

Nothing is downloaded unless ``data.options.download=true`` (torchvision then fetches the
archives and checks their md5).  Reading a folder never compares md5s: torchvision's CIFAR-10
reader checks each file against the official md5 before reading, which would refuse any copy
that is not byte-identical to the official one (a re-pickled copy, a test's tiny folder), so
:func:`local_cifar10` is torchvision's reader with those checksums set to None (torchvision's
own "file exists" check).  The training key still carries a fingerprint of the files' names
and sizes.  MNIST's reader checks only that the files exist.

CIFAR-10's pickles are unpickled by torchvision; before that each is read once with an
unpickler that admits only numpy arrays, lists, dicts, strings and numbers, so a file that
would run code when unpickled is refused instead of executed.

Images become float32 (N, C, H, W) in [-1, 1] by ``x / 127.5 - 1`` (exactly invertible by
the metrics' quantisation ``round((x + 1) * 127.5)``); labels are long in 0..9.
"""

from __future__ import annotations

import functools
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.catalog import check_data_root, data_root_error
from benchmark.data.base import Dataset, fingerprint_dataset
from benchmark.schema import UserError

RECIPE_VERSION = 1  # bump when the scaling or the splits change


def load_cifar10(root: str = "", download: bool = False, conditional: bool = True) -> Dataset:
    """CIFAR-10: train (50000, 3, 32, 32) and test (10000, 3, 32, 32) in [-1, 1], 10 classes;
    ``conditional=False`` drops the labels (every label the null label 0, K = 0), the
    unconditional setting of the published sCM, MeanFlow and Flow Matching CIFAR-10 FIDs."""
    if not isinstance(conditional, bool):
        raise UserError(f"data.options.conditional={conditional!r} is not true or false; expected "
                        "true (class-conditional) or false (unconditional)")
    from torchvision.datasets import CIFAR10

    if download:
        _ensure_downloaded("cifar10", CIFAR10, root)
    base = check_data_root("cifar10", root)
    reader = local_cifar10()
    for path in sorted((base / reader.base_folder).glob("*_batch*")) + [
            base / reader.base_folder / reader.meta["filename"]]:
        _check_plain_pickle(path, root)
    splits = {}
    for split in ("train", "test"):
        try:
            ds = reader(str(base), train=split == "train", download=False)
            images = np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2)  # NHWC -> NCHW
            labels = np.asarray(ds.targets, dtype=np.int64)
        except Exception as err:  # torchvision raises whatever the bad file provokes
            raise UserError(data_root_error("cifar10", root, f"holds a malformed {split} split "
                                            f"({type(err).__name__}: {_first_line(err)})")) from None
        splits[split] = _checked(images, labels, (3, 32, 32), 10, "cifar10", root, split)
    if not conditional:  # the recipe names it only then, so conditional fingerprints are unchanged
        splits = {k: (images, np.zeros_like(labels)) for k, (images, labels) in splits.items()}
    return _dataset("cifar10", splits, 10 if conditional else 0, root, "torchvision.datasets.CIFAR10",
                    {} if conditional else {"conditional": False})


def load_mnist(root: str = "", download: bool = False) -> Dataset:
    """MNIST: train (60000, 1, 28, 28) and test (10000, 1, 28, 28) in [-1, 1], 10 classes."""
    from torchvision.datasets import MNIST

    if download:
        _ensure_downloaded("mnist", MNIST, root)
    base = check_data_root("mnist", root)
    splits = {}
    for split in ("train", "test"):
        try:
            ds = MNIST(str(base), train=split == "train", download=False)
            images = ds.data.numpy().astype(np.uint8)[:, None]
            labels = ds.targets.numpy().astype(np.int64)
        except Exception as err:  # idx parsing fails with AssertionError, TypeError, ValueError
            raise UserError(data_root_error("mnist", root, f"holds a malformed {split} split "
                                            f"({type(err).__name__}: {_first_line(err)})")) from None
        splits[split] = _checked(images, labels, (1, 28, 28), 10, "mnist", root, split)
    return _dataset("mnist", splits, 10, root, "torchvision.datasets.MNIST")


def download_dataset(name: str, root: str) -> None:
    """Fetch ``name`` (mnist or cifar10) into ``root`` with torchvision (md5-checked)."""
    from torchvision.datasets import CIFAR10, MNIST

    _download(name, {"cifar10": CIFAR10, "mnist": MNIST}[name], root)


# ----------------------------------------------------------------------------------------
# torchvision plumbing


@functools.cache
def local_cifar10() -> type:
    """torchvision's CIFAR10 class with the md5 comparison dropped (built on first use:
    importing torchvision costs a second)."""
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        """torchvision's CIFAR-10 reader for a user's folder: files must exist and parse;
        their md5s are not compared (``check_integrity(path, None)`` tests existence)."""

        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return LocalCIFAR10


def _ensure_downloaded(name: str, cls: type, root: str) -> None:
    """Fetch only when the files are missing (torchvision would re-fetch any copy whose md5
    differs from the official one)."""
    try:
        check_data_root(name, root)
    except UserError:
        _download(name, cls, root)


def _download(name: str, cls: type, root: str) -> None:
    if not root:
        raise UserError(data_root_error(name, root, "is not set (download needs a folder to write to)"))
    Path(root).expanduser().mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            cls(str(Path(root).expanduser()), train=train, download=True)
    except Exception as err:  # offline: URLError / RuntimeError from every mirror
        raise UserError(f"data.options.download=true could not fetch {cls.__name__} into "
                        f"data.root={root!r} ({type(err).__name__}: {_first_line(err)}); expected "
                        "internet access: download it elsewhere and copy the folder, then "
                        "drop data.options.download") from None


class _PlainDataUnpickler(pickle.Unpickler):
    """Admits numpy arrays and builtin containers only; anything else is refused, not run."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _check_plain_pickle(path: Path, root: str) -> None:
    try:
        _PlainDataUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except Exception as err:
        raise UserError(data_root_error("cifar10", root, f"holds {path.name}, which is not a plain "
                                        f"data pickle ({type(err).__name__}: {_first_line(err)})")) from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else "no message"


def _checked(images: np.ndarray, labels: np.ndarray, shape: tuple[int, ...], num_classes: int,
             name: str, root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reject shapes or labels torchvision accepted but the suite cannot use."""
    if images.ndim != 4 or tuple(images.shape[1:]) != shape or len(images) != len(labels) or not len(images):
        raise UserError(data_root_error(name, root, f"holds a {split} split of shape "
                                        f"{tuple(images.shape)} with {len(labels)} labels, not "
                                        f"(N, {', '.join(map(str, shape))}) with N labels"))
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(data_root_error(name, root, f"holds {split} labels {labels.min()}..{labels.max()}, "
                                        f"not 0..{num_classes - 1}"))
    return images, labels


def _dataset(name: str, splits: dict, num_classes: int, root: str, source: str,
             extra: dict | None = None) -> Dataset:
    """uint8 splits -> a Dataset in [-1, 1]; the fingerprint hashes the exact uint8 bytes."""
    (train_u8, train_y), (test_u8, test_y) = splits["train"], splits["test"]
    recipe = {"name": name, "version": RECIPE_VERSION, "scaling": "x/127.5-1", "source": source,
              **(extra or {})}
    as_float = lambda u8: torch.from_numpy(u8.astype(np.float32) / 127.5 - 1.0)  # noqa: E731
    return Dataset(
        name=name,
        shape=tuple(train_u8.shape[1:]),
        num_classes=num_classes,
        train_x=as_float(train_u8), train_y=torch.from_numpy(train_y),
        test_x=as_float(test_u8), test_y=torch.from_numpy(test_y),
        fingerprint=fingerprint_dataset(recipe, *(torch.from_numpy(a) for a in (train_u8, train_y, test_u8, test_y))),
        params={"recipe": recipe, "range": [-1.0, 1.0], "root": str(Path(root).expanduser().resolve())},
    )
