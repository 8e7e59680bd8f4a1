"""FD / KID through torch-fidelity and clean-fid: the backends agree on the same features,
Inception runs from a locally built weights file (no download), reference features are
cached once and named in the record, precision/recall matches torch-fidelity's."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.data import Dataset, load_dataset
from benchmark.metrics.fid import (
    FidOptions,
    build_extractor,
    evaluate_fid,
    fid_from_features,
    image_features,
    kid_from_features,
)
from benchmark.metrics.inception import INCEPTION_FILES, locate_inception_weights
from benchmark.metrics.prdc import precision_recall
from benchmark.metrics.reference import reference_features
from benchmark.schema import UserError
from tests.conftest import REPO
from tests.test_datasets import write_cifar10

CPU = torch.device("cpu")
INCEPTION_TRUNK = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                   "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                   "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
                   "Mixed_7c", "AvgPool"]


def _options(**changes) -> FidOptions:
    return FidOptions(**{"extractor": "pixels", "progress": False, "batch_size": 16, **changes})


def _images(n: int, shape=(3, 32, 32), seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """Smooth random images (N, *shape) in [-1, 1]: a random low-res field, upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, shape[0], 4, 4, generator=g) * 1.6 - 0.8 + shift
    return torch.nn.functional.interpolate(low, size=shape[1:], mode="bilinear").clamp(-1, 1)


# ----------------------------------------------------------------------------------------
# A locally built Inception in each library's file layout (random weights, no download).


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's weights-inception-...pth (its FeatureExtractorInceptionV3 state_dict)
    and clean-fid's inception-2015-12-05.pt (TorchScript with a ``layers`` trunk mapping
    normalised (B, 3, 299, 299) to (B, 2048, 1, 1)), both holding the SAME random weights.

    He-normal convolutions keep activations O(1) through the ~90 layers (PyTorch's default
    init shrinks them to ~1e-8), so the features have a scale worth comparing."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep random init
            return None

    torch.save({}, folder / "empty.pth")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = RandomInception("inception-v3-compat", ["2048"],
                              feature_extractor_weights_path=str(folder / "empty.pth"))
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), folder / INCEPTION_FILES["torch-fidelity"].filename)

    class Trunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(*[getattr(net, name) for name in INCEPTION_TRUNK])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated, still works
        traced = torch.jit.trace(Trunk().eval(), torch.zeros(1, 3, 299, 299))
    traced.save(str(folder / INCEPTION_FILES["clean-fid"].filename))
    return folder


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, per_batch=4)
    return root, load_dataset("cifar10", root=str(root))


# ----------------------------------------------------------------------------------------
# The two backends on the same features.


@pytest.mark.parametrize(("n", "m", "dim"), [(300, 200, 16), (40, 50, 64), (6, 5, 32)])
def test_backends_give_the_same_fid_on_the_same_features(n: int, m: int, dim: int) -> None:
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(n, dim)).astype(np.float32)
    b = (rng.normal(size=(m, dim)) * 1.3 + 0.2).astype(np.float32)
    tf, cf = fid_from_features(a, b, "torch-fidelity"), fid_from_features(a, b, "clean-fid")
    assert tf > 0 and abs(tf - cf) <= 1e-6 * abs(tf)


def test_fid_of_gaussians_with_known_moments_matches_the_closed_form() -> None:
    # N(0, I) vs N(mu, 4 I) in 8-d: |mu|^2 + tr(I + 4I - 2 * 2I) = |mu|^2 + 8.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20000, 8)).astype(np.float32)
    b = (rng.normal(size=(20000, 8)) * 2 + 0.5).astype(np.float32)
    for backend in ("torch-fidelity", "clean-fid"):
        assert fid_from_features(a, b, backend) == pytest.approx(8 * 0.25 + 8, rel=0.03)


def test_kid_over_full_sets_is_the_same_unbiased_mmd_in_both_backends() -> None:
    # With subset size = N = M every subset is the whole set, so both equal the exact MMD^2.
    rng = np.random.default_rng(2)
    a = rng.normal(size=(60, 10)).astype(np.float32)
    b = (rng.normal(size=(60, 10)) + 0.3).astype(np.float32)
    x, y = a.astype(np.float64), b.astype(np.float64)
    k = lambda p, q: (p @ q.T / 10 + 1) ** 3  # noqa: E731
    off = lambda m: (m.sum() - np.trace(m)) / (60 * 59)  # noqa: E731
    exact = off(k(x, x)) + off(k(y, y)) - 2 * k(x, y).mean()
    tf = kid_from_features(a, b, "torch-fidelity", seed=0)
    cf = kid_from_features(a, b, "clean-fid", seed=0)
    assert tf["kid"] == pytest.approx(exact, rel=1e-4) and cf["kid"] == pytest.approx(exact, rel=1e-6)
    assert tf["kid_std"] < 1e-4 * abs(exact)


def test_pixels_features_are_identical_through_both_backends_and_so_is_fid() -> None:
    fake, real = _images(24, seed=1), _images(40, seed=2, shift=0.1)
    feats = {}
    for backend in ("torch-fidelity", "clean-fid"):
        options = _options(backend=backend)
        extractor = build_extractor(options, Path("unused"), CPU)
        feats[backend] = [image_features(x, extractor, options) for x in (fake, real)]
    assert feats["torch-fidelity"][0].shape == (24, 3 * 64)
    assert np.array_equal(feats["torch-fidelity"][0], feats["clean-fid"][0])
    tf = fid_from_features(*feats["torch-fidelity"], "torch-fidelity")
    cf = fid_from_features(*feats["clean-fid"], "clean-fid")
    assert tf > 0 and abs(tf - cf) <= 1e-6 * tf


def test_digits_classifier_features_agree_between_backends(tmp_path: Path) -> None:
    from benchmark.metrics.digits import DigitClassifier, classifier_path

    # An untrained classifier in the cache slot: the plumbing is what is compared (training
    # it would take seconds and change nothing here).
    torch.manual_seed(0)
    classifier_path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(DigitClassifier().state_dict(), classifier_path(tmp_path))
    digits = load_dataset("digits")
    images = digits.test_x[:50]
    feats = []
    for backend in ("torch-fidelity", "clean-fid"):
        options = _options(backend=backend, extractor="digits", batch_size=25)
        feats.append(image_features(images, build_extractor(options, tmp_path, CPU), options))
    assert feats[0].shape == (50, 64)
    np.testing.assert_allclose(feats[0], feats[1], rtol=1e-5, atol=1e-5)


def test_digits_extractor_refuses_images_that_are_not_8x8_grey() -> None:
    extractor = build_extractor(_options(extractor="digits"), Path("unused"), CPU)
    with pytest.raises(UserError, match=r"eval.extractor=digits reads 8x8 grey images.*\(3, 32, 32\)"):
        extractor.adapt(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------
# Inception from local files.


def test_constant_images_give_the_same_inception_features_in_both_backends(inception_dir: Path) -> None:
    # A constant image survives both resizers (TF1 bilinear on uint8, PIL bicubic on float)
    # unchanged, so the two files' networks and input scalings must agree exactly.
    levels = torch.tensor([[-1.0, 0.0, 0.5], [0.2, -0.6, 1.0], [0.9, 0.9, -0.3]])
    images = levels[:, :, None, None].expand(-1, -1, 32, 32).contiguous()
    feats = []
    for backend in ("torch-fidelity", "clean-fid"):
        options = _options(backend=backend, extractor="inception-v3", inception_weights=str(inception_dir))
        feats.append(image_features(images, build_extractor(options, Path("unused"), CPU), options))
    assert feats[0].shape == (3, 2048) and np.abs(feats[0]).mean() > 1e-3
    np.testing.assert_allclose(feats[0], feats[1], rtol=1e-3, atol=1e-4 * np.abs(feats[0]).max())


def test_grey_images_reach_inception_as_three_equal_channels(inception_dir: Path) -> None:
    options = _options(extractor="inception-v3", inception_weights=str(inception_dir))
    extractor = build_extractor(options, Path("unused"), CPU)
    grey = _images(2, shape=(1, 16, 16), seed=3)
    np.testing.assert_array_equal(image_features(grey, extractor, options),
                                  image_features(grey.expand(-1, 3, -1, -1), extractor, options))


def test_fid_on_cifar_names_and_reuses_its_cached_reference(cifar, tmp_path: Path) -> None:
    _, ds = cifar
    options = _options(num_reference=12)
    first = evaluate_fid(_images(6, seed=5), ds, options=options, cache_dir=tmp_path)
    again = evaluate_fid(_images(6, seed=5), ds, options=options, cache_dir=tmp_path)
    ref = first["reference"]
    assert ref["cached"] is False and again["reference"]["cached"] is True
    assert ref["images"] == 12 and ref["of"] == 20 and ref["resolution"] == [3, 32, 32]
    assert ref["fingerprint"] == ds.fingerprint and ref["extractor"] == "fewstep-pixels8-v1"
    assert math.isfinite(first["fd"]) and first["fd"] > 0 and again["fd"] == first["fd"]
    assert again["kid"] == first["kid"]


def test_reference_cache_is_keyed_by_backend_and_extractor_and_survives_corruption(
        cifar, tmp_path: Path) -> None:
    _, ds = cifar
    made = {}
    for backend in ("torch-fidelity", "clean-fid"):
        options = _options(backend=backend)
        _, info = reference_features(ds, build_extractor(options, tmp_path, CPU), options, tmp_path)
        made[backend] = tmp_path / info["cache"]
    assert made["torch-fidelity"] != made["clean-fid"] and all(p.is_file() for p in made.values())
    made["clean-fid"].write_bytes(b"torn")
    options = _options(backend="clean-fid")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        feats, info = reference_features(ds, build_extractor(options, tmp_path, CPU), options, tmp_path)
    assert info["cached"] is False and feats.shape == (20, 192)
    assert np.load(made["clean-fid"], allow_pickle=False)["features"].shape == (20, 192)


def test_inception_state_dict_with_pickled_code_is_refused(tmp_path: Path, cifar) -> None:
    _, ds = cifar
    bad = tmp_path / INCEPTION_FILES["torch-fidelity"].filename
    bad.write_bytes(pickle.dumps({"weights": os.system}))
    options = _options(extractor="inception-v3", inception_weights=str(bad))
    with pytest.raises(UserError, match="unreadable as a plain state_dict"):
        evaluate_fid(_images(2), ds, options=options, cache_dir=tmp_path)


def test_missing_inception_weights_name_the_file_and_where_to_put_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError) as err:
        locate_inception_weights("torch-fidelity")
    text = str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in text and str(tmp_path / "torch") in text
    assert "\n" not in text
    with pytest.raises(UserError, match=r"eval.inception_weights='.*nope' does not exist"):
        locate_inception_weights("clean-fid", str(tmp_path / "nope"))


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmark.run", *args], cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
                          capture_output=True, text=True, timeout=300)


def test_cli_missing_inception_weights_is_one_line_exit_2_before_training(cifar, tmp_path: Path) -> None:
    root, _ = cifar
    result = _cli("data=cifar10", f"data.root={root}", f"results_dir={tmp_path / 'results'}",
                  env={"TORCH_HOME": str(tmp_path / "empty-torch-home")})
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Inception weights for eval.backend=torch-fidelity")
    assert "weights-inception-2015-12-05-6726825d.pth" in lines[0]
    assert not (tmp_path / "results" / "runs").exists()  # refused at planning: nothing trained


def test_cli_cifar10_with_local_inception_weights_records_the_reference(
        inception_dir: Path, cifar, tmp_path: Path) -> None:
    from benchmark.run import main

    root, ds = cifar
    results = tmp_path / "results"
    code = main(["method=fm", "data=cifar10", f"data.root={root}", "model=dit-tiny", "train.steps=2",
                 "train.batch_size=4", "train.warmup_steps=1", "train.progress=false",
                 "eval.num_samples=4", "eval.num_reference=6", "eval.progress=false",
                 f"eval.inception_weights={inception_dir}", "eval.precision_recall=true",
                 "tracking.enabled=false", f"results_dir={results}"])
    assert code == 0
    record = json.loads(next(results.glob("runs/*/evals/*.json")).read_text())
    assert record["reference"]["dataset"] == "cifar10" and record["reference"]["images"] == 6
    assert record["reference"]["fingerprint"] == ds.fingerprint
    assert record["metric_seconds"] > 0 and record["sample_seconds"] > 0
    assert math.isfinite(record["metrics"]["fd"]) and 0 <= record["metrics"]["precision"] <= 1
    assert record["identity"]["eval"]["extractor"] == "inception-v3"
    assert record["reference"]["extractor"].startswith("inception-v3-torch-fidelity-")
    assert record["reference"]["resolution"] == [3, 32, 32] and record["reference"]["cached"] is False
    assert next(results.glob("runs/*/samples/*.png")).stat().st_size > 0


# ----------------------------------------------------------------------------------------
# Precision / recall.


def test_precision_recall_equal_torch_fidelitys_prc_on_the_same_features() -> None:
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    rng = np.random.default_rng(4)
    real = rng.normal(size=(120, 6))
    fake = rng.normal(size=(90, 6)) * 0.7 + 0.4
    ours = precision_recall(real, fake)
    precision, recall = calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real))
    assert ours["precision"] == pytest.approx(precision, abs=1e-6)  # theirs is a float32 mean
    assert ours["recall"] == pytest.approx(recall, abs=1e-6)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1


def test_identical_sets_have_full_precision_recall_and_far_sets_none() -> None:
    rng = np.random.default_rng(5)
    real = rng.normal(size=(20, 4))  # <= 25 rows: cdist is exact, so ties on radii are exact too
    same = precision_recall(real, real.copy())
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] == pytest.approx(1.0 + 1.0 / 3)  # each point also sits in 3 others' balls
    far = precision_recall(real, real + 100.0)
    assert far["precision"] == far["recall"] == far["density"] == far["coverage"] == 0.0
