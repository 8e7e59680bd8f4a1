"""Low-dimensional toy densities with exact samplers and known moments.

Every toy draws its fixed train set (``num_train`` samples, default 20000) from
``torch.Generator().manual_seed(seed)`` and exposes ``exact_sampler(n, generator)`` for
fresh exact samples, so metrics compare a generator with the true density, not with the
train set.  The 2-D shapes are standardised to mean 0 and std 1 per coordinate (with
their analytic moments, so the statement is exact, not an estimate); ``params`` holds
the mean and std per coordinate and the shape parameters before standardising.

| name            | shape | before standardising                                            |
| --------------- | ----- | --------------------------------------------------------------- |
| checkerboard    | (2,)  | 8 unit squares of a 4x4 board on [-2, 2]^2; scaled by sqrt(3)/2  |
| eight_gaussians | (2,)  | 8 equal modes on a circle of radius 1.4, each isotropic std 0.1 |
| two_moons       | (2,)  | sklearn's two half circles (radius 1), Gaussian noise std 0.1    |
| spirals         | (2,)  | two arms r = theta, theta = 3 pi sqrt(u), Gaussian noise std 0.3 |
| gaussian1d      | (1,)  | N(mean = 1.3, std = 0.4), options ``mean``, ``std``; not scaled   |
| gaussian2d      | (2,)  | N((1, -0.5), diag(0.5, 1.5)^2), options ``mean``, ``std``; not scaled |

Eight Gaussians is not rescaled: its std per coordinate is sqrt(1.4^2 / 2 + 0.1^2) = 0.995.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch

from benchmark.data.base import Dataset, fingerprint_dataset

TOY_RECIPE_VERSION = 1  # bump when any sampler below changes
TOY_NUM_TRAIN = 20_000
TOY_TRAIN_SEED = 0

Sampler = Callable[[int, torch.Generator], torch.Tensor]

# ----------------------------------------------------------------------------------------
# Exact samplers: (n, generator) -> float32 (n, d), before standardising.


def _sample_checkerboard(n: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform on the 8 dark squares of a 4x4 board on [-2, 2]^2 -> (n, 2)."""
    x1 = torch.rand(n, generator=generator) * 4 - 2
    x2 = torch.rand(n, generator=generator) - 2 * torch.randint(0, 2, (n,), generator=generator)
    # Odd columns shift up by one square: each column keeps 2 of its 4 squares.
    x2 = x2 + torch.floor(x1).remainder(2)
    return torch.stack([x1, x2], dim=1)


def _sample_eight_gaussians(
    n: int, generator: torch.Generator, radius: float, mode_std: float
) -> torch.Tensor:
    """Equal mixture of 8 isotropic Gaussians centred on a circle -> (n, 2)."""
    angle = torch.randint(0, 8, (n,), generator=generator) * (2 * math.pi / 8)
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + mode_std * torch.randn(n, 2, generator=generator)


def _sample_two_moons(n: int, generator: torch.Generator, noise: float) -> torch.Tensor:
    """sklearn ``make_moons``: upper (cos t, sin t), lower (1 - cos t, 1/2 - sin t) -> (n, 2)."""
    t = torch.rand(n, generator=generator) * math.pi
    lower = torch.randint(0, 2, (n,), generator=generator).bool()
    upper_xy = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    lower_xy = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], dim=1)
    xy = torch.where(lower[:, None], lower_xy, upper_xy)
    return xy + noise * torch.randn(n, 2, generator=generator)


def _sample_spirals(
    n: int, generator: torch.Generator, max_angle: float, noise: float
) -> torch.Tensor:
    """Two Archimedean arms theta * (-cos theta, sin theta), the second mirrored -> (n, 2)."""
    # sqrt(u) makes the density uniform along the arm's length, roughly.
    theta = max_angle * torch.sqrt(torch.rand(n, generator=generator))
    arm = theta[:, None] * torch.stack([-torch.cos(theta), torch.sin(theta)], dim=1)
    sign = 2.0 * torch.randint(0, 2, (n, 1), generator=generator) - 1.0
    return sign * arm + noise * torch.randn(n, 2, generator=generator)


def _sample_gaussian(
    n: int, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Axis-aligned Gaussian N(mean, diag(std)^2) -> (n, len(mean))."""
    noise = torch.randn(n, len(mean), generator=generator)
    return torch.tensor(mean, dtype=torch.float32) + torch.tensor(std) * noise


def _standardised(
    sampler: Sampler, mean: Sequence[float], std: Sequence[float]
) -> Sampler:
    """Wrap ``sampler`` so its output has mean 0 and std 1 given its analytic moments."""

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        return (sampler(n, generator) - torch.tensor(mean)) / torch.tensor(std)

    return sample


# ----------------------------------------------------------------------------------------
# Analytic moments before standardising.


def _two_moons_moments(noise: float) -> tuple[list[float], list[float]]:
    """Mean and std per coordinate of the two moons (mixture of two half circles)."""
    # x: half-circle means 0 and 1, within variance E[cos^2 t] = 1/2.
    # y: means 2/pi and 1/2 - 2/pi, within variance 1/2 - (2/pi)^2.
    var_x = 0.5 + 0.25 + noise**2
    gap_y = 4 / math.pi - 0.5
    var_y = 0.5 - (2 / math.pi) ** 2 + (gap_y / 2) ** 2 + noise**2
    return [0.5, 0.25], [math.sqrt(var_x), math.sqrt(var_y)]


def _spirals_moments(max_angle: float, noise: float) -> tuple[list[float], list[float]]:
    """Mean (0 by the mirror symmetry) and std per coordinate of the two spirals."""
    from scipy.integrate import quad  # the only scipy use in the data package

    # theta = max_angle sqrt(u) has density 2 theta / max_angle^2 on [0, max_angle].
    def moment(trig: Callable[[float], float]) -> float:
        def integrand(th: float) -> float:
            return th**2 * trig(th) ** 2 * 2 * th / max_angle**2

        return quad(integrand, 0.0, max_angle, limit=200)[0]

    var_x = moment(math.cos) + noise**2
    var_y = moment(math.sin) + noise**2
    return [0.0, 0.0], [math.sqrt(var_x), math.sqrt(var_y)]


# ----------------------------------------------------------------------------------------
# Factories (the registry entries).


def _toy_dataset(
    name: str,
    sampler: Sampler,
    params: dict,
    num_train: int,
    seed: int,
) -> Dataset:
    """Draw the fixed train set and assemble a :class:`Dataset` for a toy density."""
    if not isinstance(num_train, int) or num_train < 2:
        raise ValueError(
            f"{name} num_train={num_train!r} is invalid; expected an int >= 2 "
            f"(default {TOY_NUM_TRAIN})"
        )
    train_x = sampler(num_train, torch.Generator().manual_seed(seed)).float().contiguous()
    train_y = torch.zeros(num_train, dtype=torch.long)  # unconditional: the null label 0
    recipe = {"name": name, "version": TOY_RECIPE_VERSION, "num_train": num_train,
              "seed": seed, "params": params}
    return Dataset(
        name=name,
        shape=tuple(train_x.shape[1:]),
        num_classes=0,
        train_x=train_x,
        train_y=train_y,
        test_x=None,
        test_y=None,
        fingerprint=fingerprint_dataset(recipe, train_x, train_y),
        exact_sampler=lambda n, generator: sampler(n, generator).float(),
        params=params,
    )


def load_checkerboard(num_train: int = TOY_NUM_TRAIN, seed: int = TOY_TRAIN_SEED) -> Dataset:
    """4x4 checkerboard, (N, 2), mean 0 and std 1 per coordinate."""
    raw_std = 2 / math.sqrt(3)  # each coordinate is marginally uniform on [-2, 2]
    sampler = _standardised(_sample_checkerboard, [0.0, 0.0], [raw_std, raw_std])
    params = {"mean": [0.0, 0.0], "std": [1.0, 1.0], "half_width": 2.0, "scale": 1 / raw_std}
    return _toy_dataset("checkerboard", sampler, params, num_train, seed)


def load_eight_gaussians(num_train: int = TOY_NUM_TRAIN, seed: int = TOY_TRAIN_SEED) -> Dataset:
    """8 Gaussians on a circle of radius 1.4 with std 0.1, (N, 2), std 0.995 per coordinate."""
    radius, mode_std = 1.4, 0.1
    sampler = partial(_sample_eight_gaussians, radius=radius, mode_std=mode_std)
    std = math.sqrt(radius**2 / 2 + mode_std**2)  # E[cos^2] = 1/2 over the 8 angles
    params = {"mean": [0.0, 0.0], "std": [std, std], "radius": radius, "mode_std": mode_std}
    return _toy_dataset("eight_gaussians", sampler, params, num_train, seed)


def load_two_moons(num_train: int = TOY_NUM_TRAIN, seed: int = TOY_TRAIN_SEED) -> Dataset:
    """Two moons (noise 0.1), (N, 2), standardised to mean 0 and std 1 per coordinate."""
    noise = 0.1
    raw_mean, raw_std = _two_moons_moments(noise)
    sampler = _standardised(partial(_sample_two_moons, noise=noise), raw_mean, raw_std)
    params = {"mean": [0.0, 0.0], "std": [1.0, 1.0], "noise": noise,
              "raw_mean": raw_mean, "raw_std": raw_std}
    return _toy_dataset("two_moons", sampler, params, num_train, seed)


def load_spirals(num_train: int = TOY_NUM_TRAIN, seed: int = TOY_TRAIN_SEED) -> Dataset:
    """Two spirals (1.5 turns, noise 0.3), (N, 2), standardised to mean 0 and std 1."""
    max_angle, noise = 3 * math.pi, 0.3
    raw_mean, raw_std = _spirals_moments(max_angle, noise)
    raw = partial(_sample_spirals, max_angle=max_angle, noise=noise)
    params = {"mean": [0.0, 0.0], "std": [1.0, 1.0], "max_angle": max_angle, "noise": noise,
              "raw_mean": raw_mean, "raw_std": raw_std}
    return _toy_dataset("spirals", _standardised(raw, raw_mean, raw_std), params, num_train, seed)


def load_gaussian1d(
    mean: float = 1.3,
    std: float = 0.4,
    num_train: int = TOY_NUM_TRAIN,
    seed: int = TOY_TRAIN_SEED,
) -> Dataset:
    """One-dimensional N(mean, std^2), (N, 1)."""
    mean_v, std_v = _check_gaussian("gaussian1d", [mean], [std])
    sampler = partial(_sample_gaussian, mean=mean_v, std=std_v)
    params = {"mean": mean_v, "std": std_v}
    return _toy_dataset("gaussian1d", sampler, params, num_train, seed)


def load_gaussian2d(
    mean: Sequence[float] = (1.0, -0.5),
    std: Sequence[float] = (0.5, 1.5),
    num_train: int = TOY_NUM_TRAIN,
    seed: int = TOY_TRAIN_SEED,
) -> Dataset:
    """Two-dimensional axis-aligned N(mean, diag(std)^2), (N, 2)."""
    mean_v, std_v = _check_gaussian("gaussian2d", mean, std, dim=2)
    sampler = partial(_sample_gaussian, mean=mean_v, std=std_v)
    params = {"mean": mean_v, "std": std_v}
    return _toy_dataset("gaussian2d", sampler, params, num_train, seed)


def _check_gaussian(
    name: str, mean: Sequence[float], std: Sequence[float], dim: int = 1
) -> tuple[list[float], list[float]]:
    """Validate a Gaussian's mean and std (``dim`` finite numbers, std > 0); return lists."""
    try:
        mean_v, std_v = [float(m) for m in mean], [float(s) for s in std]
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} mean={mean!r}, std={std!r} are not numbers; expected {dim} number(s) each"
        ) from None
    if len(mean_v) != dim or len(std_v) != dim:
        raise ValueError(
            f"{name} mean={mean!r}, std={std!r}; expected {dim} value(s) each, "
            f"e.g. mean={[0.0] * dim}, std={[1.0] * dim}"
        )
    if not all(math.isfinite(v) for v in mean_v + std_v) or min(std_v) <= 0:
        raise ValueError(
            f"{name} mean={mean_v}, std={std_v}; expected finite means and stds > 0"
        )
    return mean_v, std_v


TOY_FACTORIES: dict[str, Callable[..., Dataset]] = {
    "checkerboard": load_checkerboard,
    "eight_gaussians": load_eight_gaussians,
    "two_moons": load_two_moons,
    "spirals": load_spirals,
    "gaussian1d": load_gaussian1d,
    "gaussian2d": load_gaussian2d,
}
