"""Metrics: the digits feature network, FD / KID through torch-fidelity, toy SWD / MMD."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import torch_fidelity
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

import benchmark.metrics.digits as digits_metrics
from benchmark.data import Dataset, load_dataset
from benchmark.metrics import FEATURE_EXTRACTOR_ID
from benchmark.metrics.toy import (
    evaluate_toy,
    mmd_rbf,
    resampled_sorted,
    sliced_wasserstein,
    wasserstein_1d,
)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding the trained classifier (trained once for the module, ~3 s)."""
    path = tmp_path_factory.mktemp("cache")
    digits_metrics.load_classifier(path)
    return path


def _blur(images: torch.Tensor) -> torch.Tensor:
    """3x3 binomial blur with replicated borders, (N, 1, 8, 8) -> (N, 1, 8, 8)."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.conv2d(padded, kernel[None, None])


# ---------------------------------------------------------------------------- classifier


def test_classifier_test_accuracy_is_above_95_percent(cache_dir: Path, digits: Dataset) -> None:
    net = digits_metrics.load_classifier(cache_dir)
    assert net.test_accuracy.item() > 0.95
    assert digits_metrics.class_accuracy(digits.test_x, digits.test_y, cache_dir) > 0.95


def test_cache_hit_loads_identical_features_without_retraining(
    cache_dir: Path, digits: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = digits_metrics.digit_features(digits.test_x, cache_dir)

    def forbidden(*args: object) -> None:
        raise AssertionError("cache hit must not retrain")

    monkeypatch.setattr(digits_metrics, "train_classifier", forbidden)
    again = digits_metrics.digit_features(digits.test_x, cache_dir)
    assert torch.equal(first, again) and first.shape == (297, 64)


def test_corrupted_cache_file_is_retrained_to_the_same_weights(
    cache_dir: Path, digits: Dataset, tmp_path: Path
) -> None:
    reference = digits_metrics.digit_features(digits.test_x, cache_dir)
    path = digits_metrics.classifier_path(tmp_path)
    path.write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match="unreadable.*retraining"):
        retrained = digits_metrics.digit_features(digits.test_x, tmp_path)
    # Training is deterministic, so the repaired file reproduces the original network.
    assert torch.equal(retrained, reference)
    assert torch.load(path, weights_only=True).keys() == digits_metrics.DigitClassifier().state_dict().keys()


def test_extractor_is_registered_in_torch_fidelity_under_its_id() -> None:
    assert FEATURE_EXTRACTORS_REGISTRY[FEATURE_EXTRACTOR_ID] is digits_metrics.DigitsFeatureExtractor
    assert FEATURE_EXTRACTOR_ID.startswith("digits-cnn-v1-")


def test_samples_outside_minus_one_one_are_clipped_before_features(
    cache_dir: Path, digits: Dataset
) -> None:
    loud = digits.test_x[:20] * 3
    assert torch.equal(
        digits_metrics.digit_features(loud, cache_dir),
        digits_metrics.digit_features(loud.clamp(-1, 1), cache_dir),
    )


# ---------------------------------------------------------------------------- FD / KID


def test_fd_of_train_against_its_copy_is_zero(cache_dir: Path, digits: Dataset) -> None:
    result = digits_metrics.digits_fd_kid(digits.train_x, digits.train_x.clone(), cache_dir=cache_dir)
    assert abs(result["fd"]) < 1e-6


def test_floor_is_small_positive_and_far_below_noise_blur_and_shuffled_pixels(
    cache_dir: Path, digits: Dataset
) -> None:
    floor = digits_metrics.digits_floor(cache_dir)
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(297, 1, 8, 8, generator=generator) * 2 - 1
    shuffled = digits.test_x.flatten(1)[:, torch.randperm(64, generator=generator)].view(-1, 1, 8, 8)
    bad = {
        "noise": noise,
        "blur": _blur(digits.test_x),
        "shuffled": shuffled,
    }
    assert 0 < floor["fd"] < 1.0
    for name, images in bad.items():
        result = digits_metrics.digits_fd_kid(images, digits.train_x, cache_dir=cache_dir)
        assert result["fd"] > 10 * floor["fd"], name
        assert result["kid"] > 0.1, name


def test_torch_fidelity_fd_equals_direct_scipy_fd(cache_dir: Path, digits: Dataset) -> None:
    through_library = digits_metrics.digits_fd_kid(digits.test_x, digits.train_x, cache_dir=cache_dir)
    direct = digits_metrics.frechet_distance(
        digits_metrics.digit_features(digits.test_x, cache_dir),
        digits_metrics.digit_features(digits.train_x, cache_dir),
    )
    assert through_library["fd"] == pytest.approx(direct, rel=1e-4)


def test_kid_of_test_against_train_is_near_zero(cache_dir: Path) -> None:
    floor = digits_metrics.digits_floor(cache_dir)
    # At N = 297 the KID estimate scatters by about +-0.02 around 0; noise scores ~2.
    assert abs(floor["kid"]) < 0.05 and floor["kid_std"] > 0


def test_class_accuracy_is_high_for_true_labels_and_chance_for_random_labels(
    cache_dir: Path, digits: Dataset
) -> None:
    random_labels = torch.randint(0, 10, (1500,), generator=torch.Generator().manual_seed(0))
    assert digits_metrics.class_accuracy(digits.test_x, digits.test_y, cache_dir) > 0.95
    assert abs(digits_metrics.class_accuracy(digits.train_x, random_labels, cache_dir) - 0.1) < 0.04


def test_evaluate_digits_returns_fd_kid_and_class_accuracy(cache_dir: Path, digits: Dataset) -> None:
    result = digits_metrics.evaluate_digits(digits.test_x, digits.test_y, cache_dir=cache_dir)
    assert set(result) == {"fd", "kid", "kid_std", "class_acc"}
    assert result["fd"] == pytest.approx(digits_metrics.digits_floor(cache_dir)["fd"], rel=1e-9)
    assert result["class_acc"] > 0.95
    unconditional = digits_metrics.evaluate_digits(digits.test_x, None, cache_dir=cache_dir)
    assert math.isnan(unconditional["class_acc"])


def test_evaluate_digits_rejects_bad_inputs_with_clear_messages(
    cache_dir: Path, digits: Dataset
) -> None:
    with pytest.raises(ValueError, match="reference='val' is unknown; expected one of: train, test"):
        digits_metrics.evaluate_digits(digits.test_x, None, cache_dir=cache_dir, reference="val")
    with pytest.raises(ValueError, match=r"shape \(4, 64\); expected a tensor \(N, 1, 8, 8\)"):
        digits_metrics.evaluate_digits(torch.zeros(4, 64), None, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="labels span 0..10; expected 0..9"):
        digits_metrics.class_accuracy(digits.test_x[:2], torch.tensor([0, 10]), cache_dir)
    with pytest.raises(ValueError, match="1 NaN"):
        nan = digits.test_x[:4].clone()
        nan[0, 0, 0, 0] = float("nan")
        digits_metrics.evaluate_digits(nan, None, cache_dir=cache_dir)


def test_extractor_feeds_torch_fidelity_uint8_images(cache_dir: Path, digits: Dataset) -> None:
    images = digits_metrics.quantise(digits.test_x)
    assert images.dtype == torch.uint8 and images.min() == 0 and images.max() == 255
    result = torch_fidelity.calculate_metrics(
        input1=digits_metrics._ImageDataset(images), input2=digits_metrics._ImageDataset(images),
        fid=True, feature_extractor=FEATURE_EXTRACTOR_ID, cuda=False, verbose=False, cache=False,
        save_cpu_ram=True, feature_extractor_weights_path=str(digits_metrics.classifier_path(cache_dir)),
    )
    assert abs(result[torch_fidelity.KEY_METRIC_FID]) < 1e-6


# ---------------------------------------------------------------------------- toys


def test_exact_1d_w1_matches_scipy_for_unequal_sample_sizes() -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, generator=generator), torch.rand(170, generator=generator) * 3
    expected = scipy.stats.wasserstein_distance(x.numpy(), y.numpy())
    assert wasserstein_1d(x, y).item() == pytest.approx(expected, rel=1e-9)


def test_1d_w1_of_a_gaussian_shifted_by_half_is_half() -> None:
    dataset = load_dataset("gaussian1d")
    samples = dataset.exact_sampler(10_000, torch.Generator().manual_seed(11)) + 0.5
    result = evaluate_toy(samples, dataset, num_reference=10_000, seed=0)
    assert result["swd"] == pytest.approx(0.5, abs=0.05)
    assert result["mean"][0] == pytest.approx(1.8, abs=0.02)
    assert result["std"][0] == pytest.approx(0.4, abs=0.02)


def test_sliced_w1_of_a_translated_copy_is_the_mean_projected_shift() -> None:
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([0.3, -0.4])
    swd = sliced_wasserstein(x, x + shift, num_projections=64, generator=torch.Generator().manual_seed(5))
    theta = torch.randn(2, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    assert swd == pytest.approx((shift.double() @ theta).abs().mean().item(), rel=1e-6)


@pytest.mark.parametrize("name", ["gaussian1d", "two_moons", "checkerboard"])
def test_exact_samples_score_near_zero_and_shifted_samples_do_not(name: str) -> None:
    dataset = load_dataset(name)
    samples = dataset.exact_sampler(4000, torch.Generator().manual_seed(99))
    same = evaluate_toy(samples, dataset, num_reference=4000, seed=0)
    shifted = evaluate_toy(samples + 0.5, dataset, num_reference=4000, seed=0)
    assert same["swd"] < 0.05 and abs(same["mmd"]) < 2e-3
    assert shifted["swd"] > 0.25 and shifted["mmd"] > 0.02


def test_mmd_is_unbiased_for_identical_distributions() -> None:
    generator = torch.Generator().manual_seed(1)
    values = [mmd_rbf(torch.randn(200, 2, generator=generator), torch.randn(200, 2, generator=generator),
                      bandwidths=[1.0]) for _ in range(20)]
    # Mean of 20 unbiased estimates sits within ~3 standard errors of 0.
    assert abs(np.mean(values)) < 3 * np.std(values) / math.sqrt(20)
    assert min(values) < 0 < max(values)


def test_a_bootstrap_draw_read_off_the_sorted_samples_equals_sorting_the_drawn_rows() -> None:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(301, 7, generator=generator, dtype=torch.float64).round(decimals=1)  # ties too
    values, order = x.sort(dim=0)
    for _ in range(5):
        rows = torch.randint(301, (301,), generator=generator)
        counts = torch.bincount(rows, minlength=301)
        assert torch.equal(resampled_sorted(values, order, counts), x[rows].sort(dim=0).values)


def test_evaluate_toy_is_deterministic_for_a_seed_and_reports_moment_errors() -> None:
    dataset = load_dataset("gaussian2d")
    samples = dataset.exact_sampler(3000, torch.Generator().manual_seed(2))
    first = evaluate_toy(samples, dataset, num_reference=3000, seed=4)
    assert first == evaluate_toy(samples, dataset, num_reference=3000, seed=4)
    assert first["mean_err"] < 0.1 and first["std_err"] < 0.1
    assert first["mean"] == pytest.approx([1.0, -0.5], abs=0.1)


def test_evaluate_toy_rejects_data_without_exact_sampler_and_wrong_shapes(digits: Dataset) -> None:
    with pytest.raises(ValueError, match="'digits' has no exact sampler"):
        evaluate_toy(digits.test_x, digits, num_reference=100, seed=0)
    with pytest.raises(ValueError, match=r"shape \(10, 2\); expected \(N >= 2, 1\)"):
        evaluate_toy(torch.zeros(10, 2), load_dataset("gaussian1d"), num_reference=100, seed=0)
