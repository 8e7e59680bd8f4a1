"""Datasets: digits layout and split, toy moments, samplers, registry errors."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from benchmark.catalog import dataset_info
from benchmark.data import DATASETS, Dataset, fingerprint_dataset, load_dataset
from benchmark.schema import UserError

TOYS = ["checkerboard", "eight_gaussians", "two_moons", "spirals", "gaussian1d", "gaussian2d"]


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


# ---------------------------------------------------------------------------- digits


def test_digits_images_are_1x8x8_float32_spanning_exactly_minus_one_to_one(digits: Dataset) -> None:
    assert digits.shape == (1, 8, 8)
    assert digits.train_x.shape[1:] == (1, 8, 8) and digits.train_x.dtype == torch.float32
    both = torch.cat([digits.train_x, digits.test_x])
    assert both.min().item() == -1.0 and both.max().item() == 1.0
    # Source pixels are integers 0..16, so x/8 - 1 lies on the 1/8 grid.
    assert torch.equal(both * 8, torch.round(both * 8))


def test_digits_split_is_1500_train_297_test_with_ten_classes(digits: Dataset) -> None:
    assert digits.num_classes == 10
    assert len(digits.train_x) == len(digits.train_y) == 1500
    assert len(digits.test_x) == len(digits.test_y) == 297
    assert digits.train_y.dtype == torch.long
    assert set(digits.train_y.tolist()) == set(range(10)) == set(digits.test_y.tolist())


def test_digits_split_is_stratified(digits: Dataset) -> None:
    train_counts = torch.bincount(digits.train_y, minlength=10).double()
    test_counts = torch.bincount(digits.test_y, minlength=10).double()
    expected_test = (train_counts + test_counts) * 297 / 1797
    assert (test_counts - expected_test).abs().max().item() <= 1.0


def test_digits_fingerprint_is_stable_across_calls(digits: Dataset) -> None:
    again = load_dataset("digits")
    assert again.fingerprint == digits.fingerprint
    assert len(digits.fingerprint) == 16
    assert torch.equal(again.train_x, digits.train_x)


def test_fingerprint_changes_when_only_the_train_set_changes(digits: Dataset) -> None:
    recipe = {"name": "digits"}
    base = fingerprint_dataset(recipe, digits.train_x, digits.train_y, digits.test_x, digits.test_y)
    nudged_x = digits.train_x.clone()
    nudged_x[0, 0, 0, 0] += 0.125
    relabelled_y = digits.train_y.clone()
    relabelled_y[0] = (relabelled_y[0] + 1) % 10
    assert fingerprint_dataset(recipe, nudged_x, digits.train_y, digits.test_x, digits.test_y) != base
    assert fingerprint_dataset(recipe, digits.train_x, relabelled_y, digits.test_x, digits.test_y) != base
    assert load_dataset("digits", split_seed=1).fingerprint != digits.fingerprint


def test_digits_has_no_exact_sampler(digits: Dataset) -> None:
    assert digits.exact_sampler is None


# ---------------------------------------------------------------------------- toys


@pytest.mark.parametrize("name", TOYS)
def test_toy_exact_samples_match_the_documented_mean_and_std(name: str) -> None:
    dataset = load_dataset(name)
    n = 100_000
    x = dataset.exact_sampler(n, torch.Generator().manual_seed(7)).double()
    mean, std = torch.tensor(dataset.params["mean"]), torch.tensor(dataset.params["std"])
    # 5 standard errors of the mean; the std's error is below std / sqrt(n) for these shapes.
    assert (x.mean(0) - mean).abs().max().item() < 5 * std.max().item() / math.sqrt(n)
    assert ((x.std(0) - std).abs() / std).max().item() < 0.01


@pytest.mark.parametrize("name", TOYS)
def test_toy_train_set_is_unconditional_with_20000_samples(name: str) -> None:
    dataset = load_dataset(name)
    assert dataset.num_classes == 0 and dataset.test_x is None
    assert dataset.train_x.shape == (20_000, *dataset.shape)
    assert dataset.train_x.dtype == torch.float32
    assert dataset.train_y.dtype == torch.long and dataset.train_y.abs().sum().item() == 0


def test_gaussian1d_default_train_set_has_mean_1_3_and_std_0_4() -> None:
    dataset = load_dataset("gaussian1d")
    assert dataset.shape == (1,)
    x = dataset.train_x[:, 0].double()
    assert abs(x.mean().item() - 1.3) < 4 * 0.4 / math.sqrt(20_000)
    assert abs(x.std().item() - 0.4) < 4 * 0.4 / math.sqrt(2 * 20_000)


def test_gaussian_options_set_the_moments() -> None:
    one = load_dataset("gaussian1d", mean=-2.0, std=3.0)
    two = load_dataset("gaussian2d", mean=[0.5, 4.0], std=[0.1, 2.0])
    assert one.params == {"mean": [-2.0], "std": [3.0]}
    x = two.exact_sampler(100_000, torch.Generator().manual_seed(0)).double()
    assert torch.allclose(x.mean(0), torch.tensor([0.5, 4.0], dtype=torch.float64), atol=0.03)
    assert torch.allclose(x.std(0), torch.tensor([0.1, 2.0], dtype=torch.float64), rtol=0.01)
    assert one.fingerprint != load_dataset("gaussian1d").fingerprint


@pytest.mark.parametrize("name", TOYS)
def test_exact_sampler_is_reproducible_for_a_fixed_generator_seed(name: str) -> None:
    sampler = load_dataset(name).exact_sampler
    first = sampler(500, torch.Generator().manual_seed(3))
    again = sampler(500, torch.Generator().manual_seed(3))
    other = sampler(500, torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_toy_train_set_is_fixed_by_its_seed() -> None:
    assert torch.equal(load_dataset("spirals").train_x, load_dataset("spirals").train_x)
    assert load_dataset("spirals", seed=1).fingerprint != load_dataset("spirals").fingerprint


# ---------------------------------------------------------------------------- registry


def test_registry_holds_digits_and_every_toy() -> None:
    assert set(DATASETS) == {"digits", *TOYS, "mnist", "cifar10", "imagefolder", "latents"}


def test_unknown_dataset_name_raises_with_the_list_of_names() -> None:
    with pytest.raises(UserError, match=r"unknown dataset 'cifar'; expected one of: .*digits"):
        load_dataset("cifar")


def test_unknown_option_raises_naming_it_and_the_accepted_ones() -> None:
    with pytest.raises(UserError, match=r"data.options.colour is not an option of data=digits; "
                                        r"expected any of: test_size, split_seed"):
        load_dataset("digits", colour=True)


def test_the_catalog_declares_exactly_the_options_each_loader_takes() -> None:
    # the planner refuses unknown data.options from the catalog (torch-free), so the two
    # lists must not drift apart
    for name, factory in DATASETS.items():
        taken = tuple(p for p in inspect.signature(factory).parameters if p != "name")
        assert dataset_info(name).options == taken, name


def test_nonpositive_gaussian_std_raises_naming_the_value() -> None:
    with pytest.raises(UserError, match=r"data=gaussian1d data.options: .*std=\[-1.0\]"):
        load_dataset("gaussian1d", std=-1.0)
    with pytest.raises(UserError, match="expected 2 value"):
        load_dataset("gaussian2d", mean=[0.0])
