"""FD, KID and class accuracy for 8x8 digits, in the feature space of a small digits CNN.

The feature network is a 2-conv + 2-linear classifier trained on the digits TRAIN split
only; its 64-d penultimate activation plays Inception's pool3 role.  Its weights are
cached as a plain state_dict under ``cache_dir`` by a hash of the training recipe and the
data fingerprint, so every process that evaluates shares one network.

FD and KID are computed by torch-fidelity (``calculate_metrics``) with this network
registered as a feature extractor, on datasets of images -- never on a generator wrapper
(torch-fidelity 0.4 crashes on class-conditional generators under numpy 2).

Images reach the extractor the way torch-fidelity expects them: uint8 (B, 1, 8, 8).  The
float images in [-1, 1] are clipped to [-1, 1], then quantised to
``round((x + 1) * 127.5)``; the real data goes through the same map, so the floor (test
vs train) is measured exactly like a generator.  The classifier is trained on quantised
images too.  Values: ``fd`` is the Frechet distance, ``kid`` the KID mean (cubic
polynomial kernel, unbiased, ``kid_subsets`` subsets of min(1000, N, M) samples).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch_fidelity
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from benchmark.data import Dataset, load_dataset
from benchmark.metrics import DIGITS_CLASSIFIER_RECIPE, FEATURE_EXTRACTOR_ID

DEFAULT_CACHE_DIR = "results/cache"
FEATURE_LAYER = "penultimate"
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
KID_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000
METRIC_SEED = 2020  # torch-fidelity's default: draws the KID subsets

# ----------------------------------------------------------------------------------------
# Quantisation: the one map from float images to what every network sees.


def quantise(images: Tensor) -> Tensor:
    """Float images (N, 1, 8, 8), clipped to [-1, 1] -> uint8 (N, 1, 8, 8) in 0..255."""
    return torch.round((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)


def dequantise(images: Tensor) -> Tensor:
    """uint8 (N, 1, 8, 8) -> float32 (N, 1, 8, 8) in [-1, 1]."""
    return images.float() / 127.5 - 1


# ----------------------------------------------------------------------------------------
# The classifier.


class DigitClassifier(nn.Module):
    """x float (B, 1, 8, 8) in [-1, 1] -> logits (B, 10); ``features`` gives (B, 64)."""

    def __init__(self, feature_dim: int = DIGITS_CLASSIFIER_RECIPE["feature_dim"]) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, NUM_CLASSES)
        # Train-set mean / std of the raw features: standardised features keep KID's cubic
        # kernel (x.y / D + 1)^3 near 1 and make FD read in units of per-feature variance.
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        # Stored with the weights so a cache hit still reports how good the network is.
        self.register_buffer("test_accuracy", torch.zeros(()))

    def raw_features(self, x: Tensor) -> Tensor:
        """(B, 1, 8, 8) -> penultimate activations (B, feature_dim), what the head reads."""
        return self.embed(self.conv(x))

    def features(self, x: Tensor) -> Tensor:
        """(B, 1, 8, 8) -> standardised penultimate activations (B, feature_dim): FD / KID space."""
        return (self.raw_features(x) - self.feature_mean) / self.feature_std

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.raw_features(x))


@functools.cache
def _digits() -> Dataset:
    """The digits dataset, loaded once per process (read-only here)."""
    return load_dataset("digits")


def _recipe_key(dataset: Dataset) -> str:
    """Hash of the training recipe and the digits fingerprint: names the weight file."""
    recipe = {**DIGITS_CLASSIFIER_RECIPE, "data": dataset.fingerprint}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def classifier_path(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Path:
    """Where the digits classifier's state_dict lives for the current recipe."""
    return Path(cache_dir) / f"digits_classifier-{_recipe_key(_digits())}.pt"


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one thread: float reductions then do not depend on the machine's cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_classifier(dataset: Dataset) -> DigitClassifier:
    """Train the digits CNN on ``dataset``'s train split only; deterministic on CPU.

    Uses AdamW with a cosine schedule (recipe in ``DIGITS_CLASSIFIER_RECIPE``) on quantised
    images, and stores the test-split accuracy in ``test_accuracy``.
    """
    recipe = DIGITS_CLASSIFIER_RECIPE
    x, y = dequantise(quantise(dataset.train_x)), dataset.train_y
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])  # weight init, without touching the caller's RNG
        net = DigitClassifier(recipe["feature_dim"])
        generator = torch.Generator().manual_seed(recipe["seed"])
        opt = torch.optim.AdamW(net.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
        steps = recipe["epochs"] * -(-len(x) // recipe["batch_size"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        for _ in range(recipe["epochs"]):
            for idx in torch.randperm(len(x), generator=generator).split(recipe["batch_size"]):
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            raw = net.raw_features(x)
        net.feature_mean.copy_(raw.mean(dim=0))
        net.feature_std.copy_(raw.std(dim=0).clamp_min(1e-6))
        net.test_accuracy.fill_(_accuracy(net, dataset.test_x, dataset.test_y))
    return net


@torch.no_grad()
def _accuracy(net: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of images (N, 1, 8, 8) whose argmax logit equals labels (N,)."""
    predicted = net(dequantise(quantise(images))).argmax(dim=1)
    return (predicted == labels).float().mean().item()


def _save_atomic(state: dict[str, Tensor], path: Path) -> None:
    """torch.save to a temp file in the same folder, then os.replace: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_state(path: Path) -> DigitClassifier:
    """Load the weights (state_dict only, ``weights_only=True``) into a fresh network."""
    net = DigitClassifier()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def load_classifier(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> DigitClassifier:
    """The digits classifier from ``cache_dir``; trained (~10 s on one CPU) on a miss.

    A cache file that cannot be read is retrained and overwritten with a one-line warning.
    """
    path = classifier_path(cache_dir)
    if path.exists():
        try:
            return _load_state(path)
        except Exception as error:  # any unreadable file: torn, truncated, wrong keys
            warnings.warn(
                f"digits classifier cache {path} is unreadable ({type(error).__name__}); "
                "retraining and overwriting it",
                RuntimeWarning,
                stacklevel=2,
            )
    start = time.perf_counter()
    net = train_classifier(_digits())
    _save_atomic(net.state_dict(), path)
    accuracy = net.test_accuracy.item()
    print(f"trained digits classifier in {time.perf_counter() - start:.1f} s, "
          f"test accuracy {accuracy:.4f}, saved to {path}")
    if accuracy < 0.95:
        warnings.warn(f"digits classifier test accuracy {accuracy:.4f} < 0.95; FD/KID are "
                      f"unreliable: delete {path} and check the recipe", RuntimeWarning, stacklevel=2)
    return net.eval()


# ----------------------------------------------------------------------------------------
# torch-fidelity plumbing.


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor: uint8 (B, 1, 8, 8) -> features (B, 64) and/or logits (B, 10).

    torch-fidelity builds it as ``cls(name, features_list, **calculate_metrics_kwargs)``;
    the weights come from ``feature_extractor_weights_path`` (a state_dict file).
    """

    def __init__(self, name: str, features_list: list[str], **kwargs: object) -> None:
        super().__init__(name, features_list)
        weights_path = kwargs.get("feature_extractor_weights_path")
        if weights_path is None:
            raise ValueError(
                f"feature extractor {name!r} needs feature_extractor_weights_path=<state_dict "
                "file>; call benchmark.metrics.digits.digits_fd_kid instead of torch-fidelity"
            )
        self.net = _load_state(Path(str(weights_path)))

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (FEATURE_LAYER, "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return FEATURE_LAYER

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, *IMAGE_SHAPE, dtype=torch.uint8)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"expected uint8 images (B, 1, 8, 8), got {images.dtype} "
                             f"{tuple(images.shape)}; quantise them with quantise()")
        raw = self.net.raw_features(dequantise(images))
        features = (raw - self.net.feature_mean) / self.net.feature_std
        computed = {FEATURE_LAYER: features, "logits": self.net.head(raw)}
        return tuple(computed[name] for name in self.features_list)


if FEATURE_EXTRACTOR_ID not in FEATURE_EXTRACTORS_REGISTRY:  # re-imports must not re-register
    torch_fidelity.register_feature_extractor(FEATURE_EXTRACTOR_ID, DigitsFeatureExtractor)


class _ImageDataset(torch.utils.data.Dataset):
    """uint8 images (N, 1, 8, 8) as a map-style dataset, one (1, 8, 8) tensor per item."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


# ----------------------------------------------------------------------------------------
# Public metrics.


def _check_images(images: Tensor, what: str) -> None:
    """Reject anything that is not a finite float batch (N >= 2, 1, 8, 8) with a clear message."""
    if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{what} has shape {shape}; expected a tensor (N, 1, 8, 8) in [-1, 1]")
    if len(images) < 2:
        raise ValueError(f"{what} holds {len(images)} image(s); FD and KID need at least 2")
    bad = (~torch.isfinite(images)).sum().item()
    if bad:
        raise ValueError(f"{what} holds {bad} NaN/inf value(s); expected finite images in "
                         "[-1, 1] (a diverged sampler?)")


def digit_features(images: Tensor, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Tensor:
    """Penultimate features (N, 64) of images (N, 1, 8, 8), clipped and quantised first.

    The same features torch-fidelity sees; used to cross-check its FD.
    """
    _check_images(images, "images")
    net = load_classifier(cache_dir)
    with torch.no_grad():
        return net.features(dequantise(quantise(images)))


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to features (N, D) and (M, D), via scipy sqrtm."""
    a, b = features_a.double().cpu().numpy(), features_b.double().cpu().numpy()
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def digits_fd_kid(
    images_a: Tensor,
    images_b: Tensor,
    *,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    seed: int = METRIC_SEED,
) -> dict[str, float]:
    """FD and KID between two image sets (N, 1, 8, 8) and (M, 1, 8, 8), via torch-fidelity.

    Both sets are clipped to [-1, 1] and quantised to uint8.  Returns ``fd``, ``kid`` (mean
    over subsets) and ``kid_std``; ``seed`` draws the KID subsets.
    """
    _check_images(images_a, "images_a")
    _check_images(images_b, "images_b")
    load_classifier(cache_dir)  # trains or repairs the cache before torch-fidelity reads it
    result = torch_fidelity.calculate_metrics(
        input1=_ImageDataset(quantise(images_a)),
        input2=_ImageDataset(quantise(images_b)),
        fid=True,
        kid=True,
        feature_extractor=FEATURE_EXTRACTOR_ID,
        feature_layer_fid=FEATURE_LAYER,
        feature_layer_kid=FEATURE_LAYER,
        feature_extractor_weights_path=str(classifier_path(cache_dir)),
        kid_subsets=KID_SUBSETS,
        kid_subset_size=min(KID_MAX_SUBSET_SIZE, len(images_a), len(images_b)),
        batch_size=512,
        cuda=False,          # an 8x8 CNN: the CPU is fast enough and bitwise stable
        cache=False,         # inputs are anonymous tensors; our own cache keys live above
        save_cpu_ram=True,   # no DataLoader worker processes
        rng_seed=seed,
        verbose=False,
    )
    return {
        "fd": float(result[torch_fidelity.KEY_METRIC_FID]),
        "kid": float(result[torch_fidelity.KEY_METRIC_KID_MEAN]),
        "kid_std": float(result[torch_fidelity.KEY_METRIC_KID_STD]),
    }


def class_accuracy(
    images: Tensor, labels: Tensor, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR
) -> float:
    """Fraction of images (N, 1, 8, 8) the classifier assigns to their label (N,) in 0..9."""
    _check_images(images, "images")
    if labels.shape != (len(images),) or labels.dtype.is_floating_point:
        raise ValueError(f"labels have shape {tuple(labels.shape)} and dtype {labels.dtype}; "
                         f"expected integer labels ({len(images)},) matching the images")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels span {labels.min().item()}..{labels.max().item()}; expected "
                         f"0..{NUM_CLASSES - 1} (pass labels=None for unconditional samples)")
    return _accuracy(load_classifier(cache_dir), images, labels.cpu())


def evaluate_digits(
    samples: Tensor,
    labels: Tensor | None,
    *,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    reference: str = "train",
    seed: int = METRIC_SEED,
) -> dict[str, float]:
    """FD, KID and class accuracy of generated digits against a real split.

    Args:
        samples: (N, 1, 8, 8) in [-1, 1]; values outside are clipped before quantisation.
        labels: (N,) conditioning labels in 0..9, or None for unconditional samples
            (``class_acc`` is then NaN).
        reference: ``"train"`` (1500 images) or ``"test"`` (297 images).

    Returns ``fd``, ``kid``, ``kid_std``, ``class_acc``.  FD is biased upwards at small N:
    compare rows with equal N, and read :func:`digits_floor` as the N=297 floor.
    """
    digits = _digits()
    splits = {"train": digits.train_x, "test": digits.test_x}
    if reference not in splits:
        raise ValueError(f"reference={reference!r} is unknown; expected one of: train, test")
    metrics = digits_fd_kid(samples, splits[reference], cache_dir=cache_dir, seed=seed)
    acc = float("nan") if labels is None else class_accuracy(samples, labels, cache_dir)
    return {**metrics, "class_acc": acc}


def digits_floor(
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, seed: int = METRIC_SEED
) -> dict[str, float]:
    """FD / KID of the real TEST split (297) against the TRAIN split: a perfect generator's
    expected score at N=297.  Returns ``fd``, ``kid``, ``kid_std``."""
    digits = _digits()
    return digits_fd_kid(digits.test_x, digits.train_x, cache_dir=cache_dir, seed=seed)


@functools.lru_cache(maxsize=4)
def _split_features(cache_dir: str) -> dict[str, np.ndarray]:
    """Digit features of the real train and test splits (computed once per process)."""
    digits = _digits()
    return {split: digit_features(x, cache_dir).double().numpy()
            for split, x in (("train", digits.train_x), ("test", digits.test_x))}


def _pixels(images: Tensor) -> np.ndarray:
    """Quantised images as flat float vectors (N, 64): what memorisation is measured on."""
    return quantise(images).reshape(len(images), -1).double().numpy()


def digits_report(samples: Tensor, labels: Tensor | None, *, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
                  draws: int = 200, seed: int = METRIC_SEED) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Every digits metric of one evaluation and its 95% interval.

    Metrics, all against the TRAIN split: ``fd`` (torch-fidelity, at this sample count),
    ``fd_matched`` (mean FD of random subsets of 297 samples, the size of the held-out test
    split: comparable with the floor), ``kid`` (unbiased at any N), ``class_acc``,
    ``memorized`` (fraction of samples nearer a training image, in pixels, than 95% of
    held-out test images are); and the floors of a perfect generator, the 297 held-out TEST
    images measured the same way: ``fd_floor`` (FD at N = 297) and ``kid_floor``.
    Intervals: ``estimate +- 1.96 sd`` over bootstrap resamples of the generated samples
    (``draws`` for KID; a quarter of that for the subset-averaged FD, whose draws cost 20
    FDs each) or of the test images for the floors; Wilson intervals for the proportions."""
    from benchmark.metrics.uncertainty import (
        KernelKID,
        bootstrap_interval,
        frechet_from_stats,
        gaussian_stats,
        matched_fd,
        memorisation_rate,
        wilson_interval,
    )

    cache_dir = str(cache_dir)
    metrics = evaluate_digits(samples, labels, cache_dir=cache_dir, seed=seed)
    real = _split_features(cache_dir)
    gen = digit_features(samples, cache_dir).double().numpy()
    train_stats, n_test, n = gaussian_stats(real["train"]), len(real["test"]), len(gen)
    floor = digits_floor(cache_dir, seed)
    metrics.update(fd_floor=floor["fd"], kid_floor=floor["kid"])
    metrics["fd_matched"] = matched_fd(gen, train_stats, n_test, seed=seed)

    def fd_of(rows: np.ndarray, features: np.ndarray = gen) -> float:
        return frechet_from_stats(*gaussian_stats(features[rows]), *train_stats)

    kid, kid_floor = KernelKID(gen, real["train"]), KernelKID(real["test"], real["train"])
    intervals = {
        "fd": bootstrap_interval(fd_of, n, metrics["fd"], draws=draws, seed=seed),
        "kid": bootstrap_interval(kid, n, metrics["kid"], draws=draws, seed=seed),
        "fd_matched": bootstrap_interval(lambda rows: matched_fd(gen[rows], train_stats, n_test, 5, seed), n,
                                         metrics["fd_matched"], draws=max(20, draws // 4), seed=seed),
        "fd_floor": bootstrap_interval(lambda rows: fd_of(rows, real["test"]), n_test, metrics["fd_floor"],
                                       draws=draws, seed=seed),
        "kid_floor": bootstrap_interval(kid_floor, n_test, metrics["kid_floor"], draws=draws, seed=seed),
    }
    digits = _digits()
    metrics["memorized"], _, intervals["memorized"] = memorisation_rate(
        _pixels(samples), _pixels(digits.train_x), _pixels(digits.test_x))
    if labels is not None:
        intervals["class_acc"] = wilson_interval(round(metrics["class_acc"] * n), n)
    return metrics, intervals
