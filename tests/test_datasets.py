"""Datasets read from disk: MNIST, CIFAR-10, an image folder and latent shards, each written
here in its exact on-disk format, read back, run end to end through the CLI, and broken
in the ways users break them (one line, exit code 2)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.catalog import data_files_fingerprint
from benchmark.data import load_dataset
from benchmark.schema import UserError
from tests.conftest import run_cli

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------------------
# Writers of each format, as the official files are laid out.


def write_cifar10(root: Path, per_batch: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """torchvision's cifar-10-batches-py: 5 train pickles, test_batch and batches.meta.

    Each batch is a protocol-2 pickle of {'batch_label', 'labels', 'data', 'filenames'} with
    data uint8 (N, 3072) = 1024 red, 1024 green, 1024 blue values per image, row-major.
    Returns the images (N, 3, 32, 32) and labels of each split, for checking.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    splits = {"train": ([], []), "test": ([], [])}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        entry = {"batch_label": f"{name} of tests", "labels": labels, "data": data,
                 "filenames": [f"img_{i}.png" for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        split = splits["test" if name == "test_batch" else "train"]
        split[0].append(data.reshape(-1, 3, 32, 32))
        split[1].extend(labels)
    meta = {"num_cases_per_batch": per_batch, "label_names": CIFAR_CLASSES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {k: (np.concatenate(x), np.asarray(y)) for k, (x, y) in splits.items()}


def _idx(array: np.ndarray) -> bytes:
    """The idx format: magic (0, 0, 0x08 = ubyte, ndim), big-endian int32 sizes, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, train: int = 40, test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """torchvision's MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (uncompressed)."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for split, prefix, n in (("train", "train", train), ("test", "t10k", test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
        out[split] = (images[:, None], labels.astype(np.int64))
    return out


def write_imagefolder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 6,
                      size: int = 16, seed: int = 0) -> np.ndarray:
    """<root>/<class>/<i>.png RGB images; returns them (N, 3, size, size) in sorted class order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
            images.append(pixels.transpose(2, 0, 1))
    return np.stack(images)


def write_latents(root: Path, shards: int = 2, per_shard: int = 12, shape=(4, 8, 8),
                  classes: int = 5, test: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """train-0000i.npz shards (and one test shard) holding float16 'latents' and int 'labels'."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {"train": ([], []), "test": ([], [])}
    files = [(f"train-{i:05d}.npz", "train", per_shard) for i in range(shards)] + [("test-00000.npz", "test", test)]
    for name, split, n in files:
        latents = rng.normal(0, 0.4, (n, *shape)).astype(np.float16)
        labels = rng.integers(0, classes, n).astype(np.int64)
        np.savez(root / name, latents=latents, labels=labels)
        out[split][0].append(latents)
        out[split][1].append(labels)
    return {k: (np.concatenate(x), np.concatenate(y)) for k, (x, y) in out.items()}


# ----------------------------------------------------------------------------------------
# Loaders read each format exactly.


def test_cifar10_folder_loads_pixel_exact_through_torchvision(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.shape == (3, 32, 32) and ds.num_classes == 10
    assert len(ds.train_x) == 50 and len(ds.test_x) == 10
    # (x + 1) * 127.5 inverts the scaling exactly: the uint8 pixels come back bit for bit.
    back = torch.round((ds.train_x + 1) * 127.5).to(torch.uint8).numpy()
    assert np.array_equal(back, written["train"][0])
    assert ds.train_y.tolist() == written["train"][1].tolist()
    assert ds.test_y.tolist() == written["test"][1].tolist()
    assert ds.train_x.min() >= -1 and ds.train_x.max() <= 1


def test_mnist_idx_files_load_as_1x28x28_with_their_labels(tmp_path: Path) -> None:
    written = write_mnist(tmp_path)
    ds = load_dataset("mnist", root=str(tmp_path))
    assert ds.shape == (1, 28, 28) and len(ds.train_x) == 40 and len(ds.test_x) == 10
    back = torch.round((ds.test_x + 1) * 127.5).to(torch.uint8).numpy()
    assert np.array_equal(back, written["test"][0])
    assert ds.train_y.tolist() == written["train"][1].tolist()


def test_imagefolder_labels_follow_sorted_class_folders(tmp_path: Path) -> None:
    images = write_imagefolder(tmp_path / "imgs", classes=("zebra", "ant", "moth"), per_class=3)
    ds = load_dataset("imagefolder", root=str(tmp_path / "imgs"))
    assert ds.params["classes"] == ["ant", "moth", "zebra"]
    assert ds.num_classes == 3 and ds.shape == (3, 16, 16) and ds.test_x is None
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Written in class order zebra, ant, moth; read in sorted order ant, moth, zebra.
    back = torch.round((ds.train_x + 1) * 127.5).to(torch.uint8).numpy()
    assert np.array_equal(back[:3], images[3:6]) and np.array_equal(back[6:], images[:3])


def test_imagefolder_resolution_resizes_and_centre_crops(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "imgs", per_class=2, size=20)
    ds = load_dataset("imagefolder", root=str(tmp_path / "imgs"), resolution=8, channels=1)
    assert ds.shape == (1, 8, 8) and len(ds.train_x) == 6


def test_latent_shards_concatenate_in_name_order_and_scale(tmp_path: Path) -> None:
    written = write_latents(tmp_path / "lat")
    ds = load_dataset("latents", root=str(tmp_path / "lat"), scale=0.5)
    assert ds.shape == (4, 8, 8) and len(ds.train_x) == 24 and len(ds.test_x) == 8
    expected = torch.from_numpy(written["train"][0].astype(np.float32) * 0.5)
    assert torch.equal(ds.train_x, expected)
    assert ds.num_classes == int(max(written["train"][1].max(), written["test"][1].max())) + 1


def test_decode_hook_undoes_the_scale_before_the_registered_decoder(tmp_path: Path) -> None:
    from benchmark.data.latents import DECODERS, decode_latents, register_decoder

    write_latents(tmp_path / "lat")
    register_decoder("test-double", lambda z: 2 * z)
    try:
        ds = load_dataset("latents", root=str(tmp_path / "lat"), scale=0.25, decoder="test-double")
        decoded = decode_latents(ds, ds.train_x[:3])
        assert torch.allclose(decoded, 2 * ds.train_x[:3] / 0.25)
    finally:
        DECODERS.pop("test-double")


def test_files_fingerprint_follows_content_size_not_location(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "a")
    write_cifar10(tmp_path / "b")
    first = data_files_fingerprint("cifar10", str(tmp_path / "a"))
    assert first == data_files_fingerprint("cifar10", str(tmp_path / "b"))
    write_cifar10(tmp_path / "c", per_batch=11)
    assert data_files_fingerprint("cifar10", str(tmp_path / "c")) != first


# ----------------------------------------------------------------------------------------
# Malformed data: one UserError naming the path and the expected layout.


def test_cifar10_batch_that_is_not_a_pickle_names_the_layout(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=r"data_batch_3, which is not a plain data pickle.*expected "
                                        r"cifar-10-batches-py/data_batch_1\.\.5"):
        load_dataset("cifar10", root=str(tmp_path))


def test_cifar10_pickle_that_would_run_code_is_refused_not_executed(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Payload()}))
    with pytest.raises(UserError, match="refusing to load"):
        load_dataset("cifar10", root=str(tmp_path))
    assert not marker.exists()


def test_mnist_truncated_idx_file_is_a_user_error(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(UserError, match=r"data=mnist .*malformed test split.*expected MNIST/raw"):
        load_dataset("mnist", root=str(tmp_path))


def test_imagefolder_unreadable_image_and_size_mismatch_name_the_file(tmp_path: Path) -> None:
    from PIL import Image

    write_imagefolder(tmp_path / "a", per_class=2)
    (tmp_path / "a" / "dog" / "bad.png").write_bytes(b"nope")
    with pytest.raises(UserError, match=r"dog/bad.png, which is not a readable image"):
        load_dataset("imagefolder", root=str(tmp_path / "a"))
    write_imagefolder(tmp_path / "b", per_class=2)
    Image.new("RGB", (12, 12)).save(tmp_path / "b" / "emu" / "small.png")
    with pytest.raises(UserError, match=r"emu/small.png of 12x12 pixels.*data.options.resolution"):
        load_dataset("imagefolder", root=str(tmp_path / "b"))


def test_latent_shard_without_labels_is_named(tmp_path: Path) -> None:
    write_latents(tmp_path / "lat")
    np.savez(tmp_path / "lat" / "train-00001.npz", latents=np.zeros((3, 4, 8, 8), np.float32))
    with pytest.raises(UserError, match=r"train-00001.npz, which lacks labels"):
        load_dataset("latents", root=str(tmp_path / "lat"))


def test_missing_root_names_the_path_and_the_download_option(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data.root='.*nowhere' does not exist.*download=true"):
        load_dataset("mnist", root=str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------
# Through the command line.


def _run(tmp_path: Path, *overrides: str) -> dict:
    """One tiny training and evaluation in this process; returns the evaluation record."""
    import json

    from benchmark.run import main

    results = tmp_path / "results"
    code = main(["method=fm", "model=dit-tiny", "train.steps=2", "train.batch_size=8",
                 "train.warmup_steps=1", "train.progress=false", "eval.num_samples=8",
                 "eval.batch_size=8", "eval.progress=false", "eval.grid_per_class=1",
                 "tracking.enabled=false", f"results_dir={results}", *overrides])
    assert code == 0
    records = list(results.glob("runs/*/evals/*.json"))
    assert len(records) == 1
    assert len(list(results.glob("runs/*/samples/*.png"))) == 1
    return json.loads(records[0].read_text())


@pytest.mark.parametrize("name", ["mnist", "imagefolder", "latents"])
def test_each_disk_dataset_trains_and_evaluates_end_to_end(name: str, tmp_path: Path) -> None:
    root = tmp_path / name
    {"mnist": write_mnist, "imagefolder": write_imagefolder, "latents": write_latents}[name](root)
    record = _run(tmp_path, f"data={name}", f"data.root={root}", "eval.extractor=pixels",
                  "eval.num_reference=16")
    assert record["data"] == name and record["num_samples"] == 8
    assert np.isfinite(record["metrics"]["fd"]) and record["metrics"]["fd"] > 0
    reference = record["reference"]
    assert reference["dataset"] == name and reference["split"] == "train"
    assert reference["images"] == 16 and reference["extractor"] == "fewstep-pixels8-v1"
    assert (tmp_path / "results" / "cache" / reference["cache"]).is_file()


def test_cli_missing_dataset_root_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_cli("data=cifar10", f"data.root={tmp_path / 'nowhere'}", f"results_dir={tmp_path / 'r'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data=cifar10 data.root=")
    assert "does not exist" in lines[0] and "cifar-10-batches-py/data_batch_1..5" in lines[0]
    assert not (tmp_path / "r" / "runs").exists()


def test_dry_run_with_a_missing_dataset_root_prints_the_plan_and_the_reason(tmp_path: Path) -> None:
    result = run_cli("data=cifar10", f"data.root={tmp_path / 'nowhere'}", "eval.extractor=pixels", "--dry-run")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert '"files": "not available"' in result.stdout
    assert result.stdout.count("[files not available: provisional key]") == 2  # the training and its eval
    reasons = result.stdout.split("not available (a real run stops at the first of these, before training):\n")[1]
    assert reasons.splitlines() == [f"  - data=cifar10 data.root='{tmp_path / 'nowhere'}' does not exist; "
                                    "expected cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta "
                                    "(torchvision's CIFAR-10 python pickles): point data.root at a folder "
                                    "holding it or add data.options.download=true to fetch it"]


def test_cli_malformed_dataset_is_one_line_exit_2(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(b"\x80\x02garbage")
    result = run_cli("data=cifar10", f"data.root={tmp_path}", "train.steps=1", "eval.extractor=pixels",
                     "tracking.enabled=false", f"results_dir={tmp_path / 'results'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "batches.meta, which is not a plain data pickle" in lines[0]
