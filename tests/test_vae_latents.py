"""The built-in SD-VAE path on the CPU: a small randomly initialised diffusers AutoencoderKL,
saved with save_pretrained and read back through the real loading path, encodes a generated
image folder into latent shards (resumably), two methods train on the shards, and their
samples are decoded by the same autoencoder and scored (FD/KID)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.schema import UserError
from tests.test_datasets import write_imagefolder


def tiny_vae(folder: Path, seed: int = 0) -> Path:
    """An AutoencoderKL with SD-VAE's layout shrunk (channels 8/16/16, f = 4, 16x16 images ->
    4x4x4 latents), random weights, written by save_pretrained (config.json + safetensors)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vae(tmp_path_factory.mktemp("vae"))


def _encode(*args: str) -> int:
    from benchmark.encode import main

    return main([*args, "progress=false"])


def test_encode_train_two_methods_decode_and_score(vae_dir: Path, tmp_path: Path, capsys) -> None:
    from benchmark.data import load_dataset
    from benchmark.data.latents import decode_latents
    from benchmark.data.vae import load_vae
    from benchmark.encode import adm_center_crop
    from benchmark.run import main

    images = tmp_path / "images"
    write_imagefolder(images, per_class=5, size=20)  # 20x20 -> ADM crop to the VAE's 16
    out = tmp_path / "latents"
    args = ["data=imagefolder", f"data.root={images}", f"vae={vae_dir}", f"out={out}", "shard_size=6"]
    assert _encode(*args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shards"] == {"train": 3} and manifest["latent_shape"] == [4, 4, 4]
    assert manifest["vae"]["scale_factor"] == pytest.approx(0.18215) and manifest["encoding"]["resolution"] == 16

    # The stored latents are the autoencoder's posterior mean of the ADM-cropped image, unscaled.
    from PIL import Image

    vae = load_vae(str(vae_dir))
    first = sorted((images / "cat").glob("*.png"))[0]
    pixels = np.asarray(adm_center_crop(Image.open(first).convert("RGB"), 16)).transpose(2, 0, 1)
    x = torch.from_numpy(pixels.copy()).float()[None] / 127.5 - 1
    with np.load(out / "train-00000.npz") as shard:
        assert shard["latents"].shape == (6, 4, 4, 4) and shard["latents"].dtype == np.float16
        assert float(shard["scale_factor"]) == pytest.approx(0.18215)
        np.testing.assert_allclose(shard["latents"][0], vae.encode(x).latent_dist.mean[0].detach().numpy(),
                                   rtol=2e-3, atol=2e-3)  # float16 storage
        assert list(shard["labels"]) == [0, 0, 0, 0, 0, 1]

    # Resumable: a rerun skips every shard; a missing one is encoded again, to the same bytes.
    before = {p.name: p.read_bytes() for p in out.glob("train-*.npz")}
    (out / "train-00001.npz").unlink()
    capsys.readouterr()
    assert _encode(*args) == 0
    assert "(2 already there)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("train-*.npz")} == before
    assert not list(out.glob(".*.tmp"))

    # The loader applies the recorded scale; the decode hook divides it out and decodes.
    ds = load_dataset("latents", root=str(out), decoder="sd-vae", vae=str(vae_dir))
    assert ds.shape == (4, 4, 4) and ds.num_classes == 3 and ds.params["scale"] == pytest.approx(0.18215)
    with np.load(out / "train-00000.npz") as shard:
        stored = torch.from_numpy(shard["latents"][:2].astype(np.float32))
    torch.testing.assert_close(ds.train_x[:2], stored * np.float32(0.18215))
    decoded = decode_latents(ds, ds.train_x[:2])
    torch.testing.assert_close(decoded, vae.decode(stored).sample.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    assert decoded.shape == (2, 3, 16, 16)

    # Two methods train on the shards; their samples are decoded and scored.
    results = tmp_path / "results"
    code = main(["method=fm,meanflow", "model=dit-tiny", "data=latents", f"data.root={out}",
                 "data.options.decoder=sd-vae", f"data.options.vae={vae_dir}",
                 "train.steps=3", "train.batch_size=6", "train.warmup_steps=1", "train.progress=false",
                 "eval.num_samples=6", "eval.batch_size=6", "eval.num_reference=15", "eval.extractor=pixels",
                 "eval.progress=false", "eval.grid_per_class=1", "tracking.enabled=false", f"results_dir={results}"])
    assert code == 0
    records = [json.loads(p.read_text()) for p in results.glob("runs/*/evals/*.json")]
    assert sorted(r["method"] for r in records) == ["fm", "meanflow"]
    for record in records:
        assert math.isfinite(record["metrics"]["fd"]) and record["metrics"]["fd"] > 0
        assert math.isfinite(record["metrics"]["kid"])
        assert record["reference"]["resolution"] == [3, 16, 16]  # decoded images, not latents
        assert record["reference"]["images"] == 15 and record["reference"]["fingerprint"] == ds.fingerprint
        assert len(record["identity"]["metric"]["vae"]) == 16  # the autoencoder's bytes name the key


def test_cifar10_encodes_both_splits_resized_to_the_vae(vae_dir: Path, tmp_path: Path) -> None:
    from benchmark.data import load_dataset
    from tests.test_datasets import write_cifar10

    written = write_cifar10(tmp_path / "cifar", per_batch=2)
    out = tmp_path / "out"
    assert _encode("data=cifar10", f"data.root={tmp_path / 'cifar'}", f"vae={vae_dir}", f"out={out}",
                   "shard_size=4", "dtype=float32") == 0
    assert sorted(p.name for p in out.glob("*.npz")) == ["test-00000.npz", *(f"train-0000{i}.npz" for i in range(3))]
    ds = load_dataset("latents", root=str(out))
    assert ds.shape == (4, 4, 4) and len(ds.train_x) == 10 and len(ds.test_x) == 2  # 32x32 -> 16 -> 4
    assert ds.train_y.tolist() == written["train"][1].tolist()


def test_encode_refuses_other_settings_in_the_same_folder(vae_dir: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    write_imagefolder(images, classes=("a",), per_class=3, size=16)
    args = ["data=imagefolder", f"data.root={images}", f"vae={vae_dir}", f"out={tmp_path / 'out'}"]
    assert _encode(*args) == 0
    capsys.readouterr()
    assert _encode(*args, "posterior=sample") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoding.posterior='mean', this command asks for 'sample'" in err[0]


def test_a_killed_encode_leaves_whole_shards_only_and_resumes(vae_dir: Path, tmp_path: Path,
                                                              monkeypatch) -> None:
    import benchmark.encode as encode

    images = tmp_path / "images"
    write_imagefolder(images, classes=("a", "b"), per_class=3, size=16)
    out = tmp_path / "out"
    args = ["data=imagefolder", f"data.root={images}", f"vae={vae_dir}", f"out={out}", "shard_size=2",
            "posterior=sample", "hflip=true"]
    real, calls = encode.encode_shard, []

    def dies_on_the_second_shard(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(encode, "encode_shard", dies_on_the_second_shard)
    assert _encode(*args) == 130
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".encode")) == [
        "manifest.json", "train-00000.npz"]
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    monkeypatch.setattr(encode, "encode_shard", real)
    assert _encode(*args) == 0
    with np.load(out / "train-00002.npz") as shard:  # 2 images + their mirrors
        assert shard["latents"].shape == (4, 4, 4, 4) and list(shard["labels"]) == [1, 1, 1, 1]
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


def test_single_safetensors_file_loads_the_same_autoencoder(vae_dir: Path, tmp_path: Path) -> None:
    from benchmark.data.vae import load_vae

    single = tmp_path / "vae.safetensors"
    single.write_bytes((vae_dir / "diffusion_pytorch_model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text((vae_dir / "config.json").read_text())
    a, b = load_vae(str(vae_dir)), load_vae(str(single))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    (tmp_path / "model.bin").write_bytes(b"a pickle could run code")
    with pytest.raises(UserError, match=r"data.options.vae='.*model.bin' is a .bin file, not .safetensors"):
        load_vae(str(tmp_path / "model.bin"))


def test_missing_vae_is_one_line_exit_2_before_training(tmp_path: Path) -> None:
    from tests.conftest import run_cli
    from tests.test_datasets import write_latents

    write_latents(tmp_path / "lat")
    result = run_cli("data=latents", f"data.root={tmp_path / 'lat'}", "data.options.decoder=sd-vae",
                     "data.options.scale=0.18215", f"data.options.vae={tmp_path / 'no-vae'}",
                     "eval.extractor=pixels", f"results_dir={tmp_path / 'results'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.options.vae='") and "does not exist" in lines[0]
    assert "config.json" in lines[0] and not (tmp_path / "results" / "runs").exists()
