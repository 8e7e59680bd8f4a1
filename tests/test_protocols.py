"""The published-number protocols as eval presets: ImageNet-256 against an ADM reference
batch (mu/sigma statistics and/or arr_0 images), CIFAR-10 against its 50k training images;
tested on tiny stand-ins of the same file formats, with local Inception-format weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.data import load_dataset
from benchmark.metrics.fid import (
    FidOptions,
    build_extractor,
    evaluate_fid,
    fid_from_features,
    uint8_features,
)
from benchmark.metrics.inception import file_digest
from benchmark.metrics.reference_batch import check_reference_batch
from benchmark.schema import UserError
from tests.test_datasets import write_cifar10, write_imagefolder
from tests.test_fid import inception_dir  # noqa: F401  (local Inception-format weights, slow test)

CPU = torch.device("cpu")


def _pixels(**changes) -> FidOptions:
    return FidOptions(**{"extractor": "pixels", "progress": False, "batch_size": 16, **changes})


def adm_batch(path: Path, images: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None) -> Path:
    """An .npz in the ADM suite's layout: arr_0 uint8 (N, H, W, 3), arr_1 labels, and float64
    mu/sigma when given (``images`` may be None for a statistics-only batch)."""
    arrays = {}
    if images is not None:
        arrays.update(arr_0=images, arr_1=np.arange(len(images)) % 10)
    if stats is not None:
        arrays.update(mu=stats[0].astype(np.float64), sigma=stats[1].astype(np.float64))
    np.savez(path, **arrays)
    return path


def _reference_images(n: int, side: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    return low.repeat(side // 4, axis=1).repeat(side // 4, axis=2)  # NHWC, smooth blocks


def _samples(n: int, side: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=side)


def test_fd_against_adm_statistics_matches_the_closed_form(tmp_path: Path) -> None:
    digits = load_dataset("digits")  # any dataset: an ADM batch replaces its split
    options = _pixels()
    extractor = build_extractor(options, tmp_path, CPU)
    ref = _reference_images(40)
    ref_feats = uint8_features(torch.from_numpy(ref).permute(0, 3, 1, 2), extractor, options).astype(np.float64)
    mu, sigma = ref_feats.mean(0), np.cov(ref_feats, rowvar=False)
    samples = _samples(30)
    fake = uint8_features(((samples + 1) * 127.5).round().to(torch.uint8), extractor, options)

    # mu/sigma of arr_0's own features: the same FD as from the features themselves.
    both = adm_batch(tmp_path / "both.npz", ref, (mu, sigma))
    out = evaluate_fid(samples, digits, options=_pixels(reference=str(both)), cache_dir=tmp_path)
    assert out["fd"] == pytest.approx(fid_from_features(fake, ref_feats, "torch-fidelity"), rel=1e-5)
    assert out["reference"]["fd_from"] == "mu/sigma" and out["reference"]["images"] == 40
    assert out["reference"]["sha256"] == file_digest(both)[:16] and math.isfinite(out["kid"])

    # Statistics only, mean moved by delta: FD changes by |d - delta|^2 - |d|^2, d = mu_f - mu_r.
    delta = np.full_like(mu, 0.01)
    moved = adm_batch(tmp_path / "moved.npz", None, (mu + delta, sigma))
    shifted = evaluate_fid(samples, digits, options=_pixels(reference=str(moved)), cache_dir=tmp_path)
    d = fake.astype(np.float64).mean(0) - mu
    assert shifted["fd"] - out["fd"] == pytest.approx(((d - delta) ** 2).sum() - (d ** 2).sum(), rel=1e-6)
    assert "kid" not in shifted and "images" not in shifted["reference"]

    # Images only: FD from arr_0's features, cached like a split's reference.
    images_only = adm_batch(tmp_path / "images.npz", ref, None)
    first = evaluate_fid(samples, digits, options=_pixels(reference=str(images_only)), cache_dir=tmp_path)
    again = evaluate_fid(samples, digits, options=_pixels(reference=str(images_only)), cache_dir=tmp_path)
    assert first["reference"]["fd_from"] == "arr_0" and first["fd"] == pytest.approx(out["fd"], rel=1e-5)
    assert first["reference"]["cached"] is False and again["reference"]["cached"] is True


def test_reference_batch_mistakes_are_one_line_at_planning(tmp_path: Path) -> None:
    stats_192 = (np.zeros(192), np.eye(192))
    cases = [
        (tmp_path / "nope.npz", "inception-v3", "torch-fidelity", False, "does not exist"),
        (adm_batch(tmp_path / "bad.npz", None, (np.zeros(4), np.eye(3))), "pixels", "torch-fidelity",
         False, r"holds mu \(4,\) and sigma \(3, 3\)"),
        (adm_batch(tmp_path / "s192.npz", None, stats_192), "inception-v3", "torch-fidelity", False,
         "192-d statistics but eval.extractor=inception-v3 gives 2048-d"),
        (adm_batch(tmp_path / "s2048.npz", None, (np.zeros(2048), np.eye(2048))), "inception-v3",
         "clean-fid", False, "expected eval.backend=torch-fidelity"),
        (adm_batch(tmp_path / "s192b.npz", None, stats_192), "pixels", "torch-fidelity", True,
         "precision/recall cannot be computed"),
    ]
    np.savez(tmp_path / "empty.npz", other=np.zeros(3))
    cases.append((tmp_path / "empty.npz", "pixels", "torch-fidelity", False, "holds neither mu/sigma nor arr_0"))
    for path, extractor, backend, pr, message in cases:
        with pytest.raises(UserError, match=message) as err:
            check_reference_batch(str(path), extractor, backend, pr)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("extractor", [
    "pixels",
    # 2048-d statistics: torch-fidelity's eigenvalues of a 2048x2048 product take ~10-30 s on 2 cores
    pytest.param("inception-v3", marks=pytest.mark.slow),
])
def test_imagenet256_preset_scores_against_an_adm_batch(extractor: str, request, tmp_path: Path) -> None:
    from benchmark.config import compose_points
    from benchmark.run import main

    preset = compose_points(["eval=imagenet256"])[0].config.eval
    assert (preset.num_samples, preset.backend, preset.extractor) == (50000, "torch-fidelity", "inception-v3")
    assert preset.reference.endswith("VIRTUAL_imagenet256_labeled.npz")

    # Statistics and images in the ADM layout, from the same feature network (the local,
    # randomly initialised Inception-format weights of tests/test_fid.py, or pixels).
    weights = str(request.getfixturevalue("inception_dir")) if extractor == "inception-v3" else ""
    ref = _reference_images(6)
    options = FidOptions(extractor=extractor, inception_weights=weights, progress=False)
    feats = uint8_features(torch.from_numpy(ref).permute(0, 3, 1, 2),
                           build_extractor(options, tmp_path, CPU), options).astype(np.float64)
    batch = adm_batch(tmp_path / "VIRTUAL_tiny.npz", ref, (feats.mean(0), np.cov(feats, rowvar=False)))
    write_imagefolder(tmp_path / "images", per_class=4, size=16)
    results = tmp_path / "results"
    code = main(["method=fm", "model=dit-tiny", "data=imagefolder", f"data.root={tmp_path / 'images'}",
                 "eval=imagenet256", f"eval.reference={batch}", f"eval.extractor={extractor}",
                 *([f"eval.inception_weights={weights}"] if weights else []),
                 "eval.num_samples=6", "eval.batch_size=6", "eval.progress=false", "train.steps=2",
                 "train.batch_size=6", "train.warmup_steps=1", "train.progress=false",
                 "tracking.enabled=false", f"results_dir={results}"])
    assert code == 0
    record = json.loads(next(results.glob("runs/*/evals/*.json")).read_text())
    reference = record["reference"]
    assert reference["dataset"] == "adm-reference-batch" and reference["fd_from"] == "mu/sigma"
    assert reference["sha256"] == file_digest(batch)[:16] == record["identity"]["metric"]["reference_batch"]
    assert reference["images"] == 6 and reference["extractor"].startswith(
        "inception-v3-torch-fidelity-" if weights else "fewstep-pixels8")
    assert math.isfinite(record["metrics"]["fd"]) and record["metrics"]["fd"] > 0
    assert record["num_samples"] == 6 and record["identity"]["eval"]["extractor"] == extractor


def test_cifar10_preset_is_the_published_protocol_and_labels_can_be_dropped(tmp_path: Path) -> None:
    from benchmark.config import compose_points

    ev = compose_points(["eval=cifar10"])[0].config.eval
    assert (ev.num_samples, ev.num_reference, ev.reference_split) == (50000, 50000, "train")
    assert (ev.backend, ev.extractor, ev.reference) == ("torch-fidelity", "inception-v3", "")
    write_cifar10(tmp_path, per_batch=4)
    conditional = load_dataset("cifar10", root=str(tmp_path))
    unconditional = load_dataset("cifar10", root=str(tmp_path), conditional=False)
    assert conditional.num_classes == 10 and unconditional.num_classes == 0
    assert torch.equal(unconditional.train_x, conditional.train_x) and unconditional.train_y.abs().sum() == 0
    assert unconditional.fingerprint != conditional.fingerprint
