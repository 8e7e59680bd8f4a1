"""Torch-free facts the planner needs about datasets, backbones and metrics (each metric's
own facts, its direction and the suites recording it, are in ``benchmark.metrics.registry``).

Versions salt cache keys: bump one when the code it names changes its numbers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from benchmark.metrics import FEATURE_EXTRACTOR_ID, TOY_METRIC_ID

BACKBONE_VERSIONS = {"dit": 1, "mlp": 2}  # mlp 2: linear embedding of continuous conditions


@dataclass(frozen=True)
class DatasetInfo:
    kind: str          # "image" or "toy": picks the backbone family and the metric
    conditional: bool  # has class labels (guidance is meaningful)
    version: int       # of the loader and its preprocessing
    metric: str        # metric suite (benchmark.evaluate.METRIC_SUITES)
    metric_id: str     # identity of its definitions and feature network (in evaluation keys)
    eval_samples: int = 1000  # generated samples per evaluation point unless eval.num_samples says
    options: tuple[str, ...] = ()  # what data.options may name: the loader's keyword arguments


FID_METRIC_ID = "fid-v1"
"""Identity of the fid suite's definitions (quantisation, KID subsets, reference sampling)."""

_TOY_OPTIONS = ("num_train", "seed")
_ROOT_OPTIONS = {"mnist": ("root", "download"), "cifar10": ("root", "download", "conditional"),
                 "imagefolder": ("root", "resolution", "channels"),
                 "latents": ("root", "scale", "num_classes", "decoder", "vae")}

DATASETS = {
    # metrics-v2: FD@297 against its floor, bootstrap intervals, memorisation
    "digits": DatasetInfo("image", True, 1, "digits", f"{FEATURE_EXTRACTOR_ID}/metrics-v2",
                          options=("test_size", "split_seed")),
    # Toys: 20k samples by default; their metrics are exact-sample and cheap, and at 1000
    # samples the metric's noise (~0.01-0.02 in W1) is the size of the few-step methods' errors.
    **{name: DatasetInfo("toy", False, 1, "toy", TOY_METRIC_ID, 20_000, _TOY_OPTIONS) for name in (
        "checkerboard", "eight_gaussians", "two_moons", "spirals")},
    **{name: DatasetInfo("toy", False, 1, "toy", TOY_METRIC_ID, 20_000, ("mean", "std", *_TOY_OPTIONS))
       for name in ("gaussian1d", "gaussian2d")},
    # Read from data.root (layouts below); FD/KID through benchmark.metrics.fid.
    **{name: DatasetInfo("image", True, 1, "fid", FID_METRIC_ID, options=options)
       for name, options in _ROOT_OPTIONS.items()},
}


def dataset_info(name: str) -> DatasetInfo:
    from benchmark.schema import UserError

    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; expected one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def check_data_options(name: str, options: dict) -> None:
    """Refuse, before anything runs, a ``data.options`` key the dataset's loader does not
    take (their values are checked by the loader)."""
    from benchmark.schema import UserError

    accepted = dataset_info(name).options
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(f"data.options.{unknown[0]} is not an option of data={name}; expected any of: "
                        f"{', '.join(accepted) or '(none)'}")


# ----------------------------------------------------------------------------------------
# Datasets read from data.root: the expected layout, checked and fingerprinted torch-free
# (the planner puts the fingerprint into the training key; the loaders check the same way).

_CIFAR = "cifar-10-batches-py"
_MNIST_FILES = tuple(f"MNIST/raw/{split}-{kind}-ubyte" for split in ("train", "t10k")
                     for kind in ("images-idx3", "labels-idx1"))


@dataclass(frozen=True)
class DataLayout:
    required: tuple[str, ...]  # glob patterns under the root; each must match a file
    members: tuple[str, ...]   # glob patterns of every file the data is read from (fingerprinted)
    expected: str              # the layout in words, for error messages
    download: bool = False     # torchvision can fetch it (data.options.download=true)


DATA_LAYOUTS = {
    "cifar10": DataLayout(
        tuple(f"{_CIFAR}/{name}" for name in (*(f"data_batch_{i}" for i in range(1, 6)),
                                              "test_batch", "batches.meta")),
        (f"{_CIFAR}/*_batch*", f"{_CIFAR}/batches.meta"),
        f"{_CIFAR}/data_batch_1..5, test_batch, batches.meta (torchvision's CIFAR-10 python pickles)",
        download=True),
    "mnist": DataLayout(
        _MNIST_FILES, _MNIST_FILES,
        "MNIST/raw/{train,t10k}-images-idx3-ubyte and -labels-idx1-ubyte (torchvision's MNIST, "
        "uncompressed idx files)", download=True),
    "imagefolder": DataLayout(
        ("*/*",), ("*/**/*",),
        "one subfolder per class holding its images (<root>/<class>/<name>.png|jpg|...)"),
    "latents": DataLayout(
        ("train-*.npz",), ("train-*.npz", "test-*.npz"),
        "train-*.npz shards (optional test-*.npz), each with arrays 'latents' (N, C, H, W) and "
        "'labels' (N,)"),
}


def data_root_error(name: str, root: str, problem: str) -> str:
    """One line: what is wrong with ``root``, the layout ``name`` expects and how to fix it."""
    layout = DATA_LAYOUTS[name]
    fix = ("point data.root at a folder holding it" +
           (" or add data.options.download=true to fetch it" if layout.download else ""))
    return f"data={name} data.root={root!r} {problem}; expected {layout.expected}: {fix}"


def check_data_root(name: str, root: str) -> Path:
    """The resolved root of a dataset read from disk; UserError naming what is missing."""
    from benchmark.schema import UserError

    if not root:
        raise UserError(data_root_error(name, root, "is not set"))
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(data_root_error(name, root, "does not exist" if not path.exists()
                                        else "is not a folder"))
    for pattern in DATA_LAYOUTS[name].required:
        if not any(p.is_file() for p in path.glob(pattern)):
            raise UserError(data_root_error(name, root, f"has no file matching {pattern}"))
    return path.resolve()


def data_files_fingerprint(name: str, root: str) -> str:
    """16 hex characters over the relative names and sizes of the dataset's files.

    Cheap (a directory walk, no reading), so a sweep's plan stays instant; a changed, added
    or removed file changes it, a copy of the folder elsewhere does not.
    """
    base = check_data_root(name, root)
    files = sorted({p for pattern in DATA_LAYOUTS[name].members for p in base.glob(pattern)
                    if p.is_file()})
    digest = hashlib.sha256(name.encode())
    for path in files:
        digest.update(f"{path.relative_to(base).as_posix()}|{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]
