"""Encode an image dataset into the latent shards ``data=latents`` reads.

::

    python -m benchmark.encode data=imagefolder data.root=/data/imagenet/train \\
        vae=/models/sd-vae-ft-mse out=/data/imagenet256-sdvae [resolution=256] [shard_size=10000]
    python -m benchmark.encode data=cifar10 data.root=/data/cifar vae=... out=...

Each image is read as RGB, brought to ``resolution`` x ``resolution`` by ADM's centre crop
(halve with a box filter while the short side is at least twice the target, bicubic-resize
the short side to it, crop the centre; guided-diffusion's ``center_crop_arr``, which DiT,
SiT, MeanFlow and iMF use for ImageNet-256), scaled to [-1, 1] and encoded by the
autoencoder (:mod:`benchmark.data.vae`).  The posterior mean is stored by default
(``posterior=sample`` stores one draw per image, seeded by the image's index); the official
MeanFlow/iMF pipelines instead re-draw a posterior sample and a random horizontal flip
every epoch, which fixed shards cannot do (``hflip=true`` stores each image's mirror image
too, so the loader sees both).

Output under ``out``::

    manifest.json            source, autoencoder identity, scale factor, settings, shard counts
    train-00000.npz, ...     latents (n, C, R/f, R/f) unscaled, labels (n,), scale_factor ()
    test-00000.npz, ...      CIFAR-10's test split (an image folder has only train)

Shard k of a split holds the split's images ``k * shard_size ... (k + 1) * shard_size - 1`` in
the source's order (with ``hflip=true`` followed by their mirrors).  Every file is written
atomically, so a killed run leaves no partial shard; running the same command again skips
the shards already written and encodes the rest.  A rerun with other settings (another
autoencoder, resolution, source, ...) into the same folder is refused.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from benchmark.schema import UserError, coerce_dataclass, config_field

USAGE = ("usage: python -m benchmark.encode data=imagefolder|cifar10 data.root=DIR vae=PATH out=DIR "
         "[key=value ...] [--help]")
SOURCES = ("imagefolder", "cifar10")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # bump when the shard layout or the preprocessing changes


@dataclass(frozen=True)
class EncodeConfig:
    out: str = config_field("", "folder the shards and manifest.json are written to")
    vae: str = config_field("", "AutoencoderKL folder (config.json + safetensors) or .safetensors file")
    resolution: int = config_field(0, "image side after ADM's centre crop; 0 = the autoencoder's sample_size", min=0)
    shard_size: int = config_field(10000, "source images per shard", min=1)
    batch_size: int = config_field(64, "images per encoder call (the latents do not depend on it beyond float rounding)", min=1,
                            semantic=False)
    posterior: str = config_field("mean", "what is stored: the posterior mean, or one seeded sample",
                           choices=("mean", "sample"))
    seed: int = config_field(0, "seed of posterior=sample (each image's draw depends on it and its index)")
    hflip: bool = config_field(False, "also store each image's horizontal mirror (doubles every shard)")
    dtype: str = config_field("float16", "latent dtype on disk", choices=("float16", "float32"))
    device: str = config_field("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"), semantic=False)
    progress: bool = config_field(True, "show a progress bar", semantic=False)


def help_text() -> str:
    lines = [USAGE, "", "Encode an image dataset with a local AutoencoderKL into latent shards for "
             "data=latents (resumable: run it again to finish).", "",
             "  data=NAME         imagefolder or cifar10 (with data.root=DIR)"]
    for f in fields(EncodeConfig):
        lines.append(f"  {f.name + '=':<17} {f.metadata['help']} (default {f.default!r})")
    lines += ["", "example: python -m benchmark.encode data=imagefolder data.root=/data/imagenet/train "
              "vae=/models/sd-vae-ft-mse out=/data/imagenet256-sdvae"]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[dict, EncodeConfig]:
    """(the composed data group, the encoder's settings); one UserError for any mistake."""
    import yaml

    from benchmark.config import compose
    from benchmark.schema import DataConfig

    data_args, own = [], {}
    paths = {f.name for f in fields(EncodeConfig) if f.type in ("str", str)}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            raise UserError(f"argument {arg!r} is not key=value; expected e.g. out=/data/latents ({USAGE})")
        key, value = arg.split("=", 1)
        if key == "data" or key.startswith("data."):
            data_args.append(arg)
        else:  # numbers and booleans as YAML reads them; paths and names stay strings
            own[key] = value if key in paths or not value else yaml.safe_load(value)
    config = coerce_dataclass(EncodeConfig, own, "")
    data = coerce_dataclass(DataConfig, compose(tuple(data_args))["data"], "data")
    if data.name not in SOURCES:
        raise UserError(f"data={data.name} cannot be encoded; expected data=imagefolder or data=cifar10")
    if data.name == "imagefolder" and (data.options.get("resolution") or data.options.get("channels", 3) != 3):
        raise UserError("data.options.resolution/channels shape images for training on pixels; expected "
                        "resolution=<side> for benchmark.encode (it always reads RGB)")
    if not config.out:
        raise UserError(f"out is not set; expected out=<folder for the shards> ({USAGE})")
    return asdict(data), config


# ----------------------------------------------------------------------------------------
# Sources: uint8 RGB images in a fixed order, read a shard at a time.


def adm_center_crop(image: Any, side: int) -> Any:
    """PIL image -> side x side: box-halve while the short side >= 2 side, bicubic-resize the
    short side to ``side``, take the centre (ADM's ``center_crop_arr``)."""
    from PIL import Image

    while min(image.size) >= 2 * side:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = side / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
    return image.crop((left, top, left + side, top + side))


class Source:
    """A dataset's splits as (uint8 (n, 3, R, R), labels (n,)) slices."""

    def __init__(self, data: dict) -> None:
        self.name, self.root = data["name"], data["root"] or data["options"].get("root", "")
        self.options = {k: v for k, v in data["options"].items() if k not in ("root", "download")}
        self.splits: dict[str, int] = {}
        self.classes: list[str] = []

    def read(self, split: str, lo: int, hi: int, side: int) -> tuple[Any, Any]:
        raise NotImplementedError


class ImageFolderSource(Source):
    def __init__(self, data: dict) -> None:
        from benchmark.catalog import check_data_root
        from benchmark.data.imagefolder import discover_images

        super().__init__(data)
        self.base = check_data_root("imagefolder", self.root)
        self.classes, self.samples = discover_images(self.base, self.root)
        self.splits = {"train": len(self.samples)}

    def read(self, split: str, lo: int, hi: int, side: int) -> tuple[Any, Any]:
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        from benchmark.catalog import data_root_error

        images = []
        for path, _ in self.samples[lo:hi]:
            try:
                with Image.open(path) as image:
                    images.append(np.asarray(adm_center_crop(image.convert("RGB"), side)))
            except (UnidentifiedImageError, OSError) as err:
                raise UserError(data_root_error("imagefolder", self.root, f"holds "
                                                f"{Path(path).relative_to(self.base)}, which is not a "
                                                f"readable image ({type(err).__name__})")) from None
        labels = np.asarray([label for _, label in self.samples[lo:hi]], dtype=np.int64)
        return np.stack(images).transpose(0, 3, 1, 2), labels


class Cifar10Source(Source):
    def __init__(self, data: dict) -> None:
        import torch

        from benchmark.data.torchvision_sets import load_cifar10

        super().__init__(data)
        dataset = load_cifar10(root=self.root, download=data["options"].get("download", False),
                               conditional=self.options.get("conditional", True))
        to_u8 = lambda x: ((x + 1) * 127.5).round().to(torch.uint8).numpy()  # noqa: E731  (exact: x = u8 / 127.5 - 1)
        self.arrays = {"train": (to_u8(dataset.train_x), dataset.train_y.numpy()),
                       "test": (to_u8(dataset.test_x), dataset.test_y.numpy())}
        self.splits = {split: len(images) for split, (images, _) in self.arrays.items()}
        self.classes = [str(k) for k in range(10)]

    def read(self, split: str, lo: int, hi: int, side: int) -> tuple[Any, Any]:
        import numpy as np
        from PIL import Image

        images, labels = self.arrays[split]
        resized = [np.asarray(adm_center_crop(Image.fromarray(image.transpose(1, 2, 0)), side))
                   for image in images[lo:hi]]
        return np.stack(resized).transpose(0, 3, 1, 2), labels[lo:hi].astype(np.int64)


SOURCE_CLASSES = {"imagefolder": ImageFolderSource, "cifar10": Cifar10Source}


# ----------------------------------------------------------------------------------------
# Manifest and shards.


def manifest_settings(source: Source, config: EncodeConfig, vae: Any, vae_id: str, side: int) -> dict:
    """Everything the shards' contents depend on (a rerun must match it to resume)."""
    from benchmark.catalog import data_files_fingerprint
    from benchmark.data.vae import downsampling

    factor = downsampling(vae)
    return {
        "format": "fewstep-latents", "version": FORMAT_VERSION,
        "source": {"data": source.name, "options": source.options, "classes": source.classes,
                   "files": data_files_fingerprint(source.name, source.root), "splits": source.splits},
        "vae": {"identity": vae_id, "scale_factor": float(vae.config.scaling_factor),
                "downsampling": factor, "latent_channels": int(vae.config.latent_channels)},
        "encoding": {"resolution": side, "crop": "adm-center", "posterior": config.posterior,
                     "seed": config.seed, "hflip": config.hflip, "dtype": config.dtype,
                     "shard_size": config.shard_size},
        "latent_shape": [int(vae.config.latent_channels), side // factor, side // factor],
    }


def check_or_write_manifest(out: Path, settings: dict, vae_path: str) -> None:
    """Refuse a folder encoded with other settings; otherwise (re)write the manifest."""
    from benchmark.store import atomic_write_json

    path = out / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"out={out} holds an unreadable {MANIFEST}; expected the manifest of an "
                            f"earlier benchmark.encode run: remove the folder or choose another out") from None
        differs = first_difference(old, settings)
        if differs:
            key, before, now = differs
            raise UserError(f"out={out} holds shards encoded with {key}={before!r}, this command asks for "
                            f"{now!r}; expected the same settings as before to resume, or another out folder")
    elif any(out.glob("*-*.npz")):
        raise UserError(f"out={out} holds .npz shards but no {MANIFEST}; expected an empty folder or one "
                        f"an earlier benchmark.encode run wrote")
    atomic_write_json(path, {**settings, "vae_path": vae_path, "complete": False})


def first_difference(old: dict, new: dict, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key of ``new`` whose value differs in ``old``: (key, old, new)."""
    for key in sorted(new):
        before, now = old.get(key), new[key]
        if isinstance(before, dict) and isinstance(now, dict):
            found = first_difference(before, now, f"{prefix}{key}.")
            if found:
                return found
        elif before != now:
            return f"{prefix}{key}", before, now
    return None


def shard_done(path: Path, rows: int) -> bool:
    """A shard already written with the expected row count (files are written atomically, so
    one that exists is whole unless damaged afterwards; a damaged one is encoded again)."""
    import numpy as np

    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as shard:
            return shard["latents"].shape[0] == rows and shard["labels"].shape == (rows,)
    except Exception:
        return False


def encode_shard(vae: Any, images: Any, labels: Any, first_index: int, config: EncodeConfig,
                 device: Any) -> tuple[Any, Any]:
    """uint8 (n, 3, R, R) -> (latents (n or 2n, C, R/f, R/f) unscaled, labels)."""
    import numpy as np
    import torch

    from benchmark.data.vae import downsampling, encode_images
    from benchmark.sample import per_sample_noise

    x = torch.from_numpy(images).to(device).float() / 127.5 - 1.0
    views = [(x, 0)] + ([(x.flip(-1), 1)] if config.hflip else [])
    shape = (int(vae.config.latent_channels), x.shape[-2] // downsampling(vae), x.shape[-1] // downsampling(vae))
    out = []
    for view, stream in views:
        indices = range(first_index, first_index + len(view))
        noise = (per_sample_noise(config.seed, indices, shape, stream, device)
                 if config.posterior == "sample" else None)
        out.append(encode_images(vae, view, noise, config.batch_size).cpu().numpy().astype(config.dtype))
    return np.concatenate(out), np.concatenate([labels] * len(views))


def write_shard(path: Path, latents: Any, labels: Any, scale_factor: float) -> None:
    import numpy as np

    from benchmark.store import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, latents=latents, labels=labels, scale_factor=np.float64(scale_factor))
    atomic_write_bytes(path, buffer.getvalue())


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """One encoder per output folder (a second one would write the same shards)."""
    import fcntl

    with open(out / ".encode.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"out={out} is being written by another benchmark.encode; expected one "
                            f"encoder per folder: wait for it or choose another out") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def encode(data: dict, config: EncodeConfig) -> dict:
    """Encode every split of ``data`` into ``config.out``; returns the final manifest."""
    import torch
    from tqdm import tqdm

    from benchmark.data.vae import downsampling, load_vae
    from benchmark.store import atomic_write_json
    from benchmark.vae_weights import vae_identity

    vae_id = vae_identity(config.vae, "vae")  # before reading any image: a missing VAE is one line
    source = SOURCE_CLASSES[data["name"]](data)
    vae = load_vae(config.vae, "vae")
    size = vae.config.sample_size  # an int, or (H, W) in some configs
    side = config.resolution or int(size if isinstance(size, int) else size[0])
    if side % downsampling(vae):
        raise UserError(f"resolution={side} is not a multiple of the autoencoder's downsampling "
                        f"factor {downsampling(vae)}; expected e.g. resolution={side - side % downsampling(vae)}")
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                          else "cpu" if config.device == "auto" else config.device)
    out = Path(config.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    settings = manifest_settings(source, config, vae, vae_id, side)
    with exclusive(out):
        check_or_write_manifest(out, settings, config.vae)
        total = sum(source.splits.values())
        bar = tqdm(total=total, unit="img", desc=f"encode {source.name}", disable=not config.progress)
        shards, skipped = {}, 0
        for split, count in source.splits.items():
            shards[split] = -(-count // config.shard_size)
            for k in range(shards[split]):
                lo, hi = k * config.shard_size, min(count, (k + 1) * config.shard_size)
                path = out / f"{split}-{k:05d}.npz"
                if shard_done(path, (hi - lo) * (2 if config.hflip else 1)):
                    skipped += 1
                else:
                    images, labels = source.read(split, lo, hi, side)
                    latents, labels = encode_shard(vae, images, labels, lo, config, device)
                    write_shard(path, latents, labels, settings["vae"]["scale_factor"])
                bar.update(hi - lo)
        bar.close()
        manifest = {**settings, "vae_path": config.vae, "shards": shards, "complete": True}
        atomic_write_json(out / MANIFEST, manifest)
    print(f"encoded {total} image(s) of {source.name} into {sum(shards.values())} shard(s) under {out} "
          f"({skipped} already there); latents {tuple(settings['latent_shape'])}, scale_factor "
          f"{settings['vae']['scale_factor']:g}")
    print(f"train on them: python -m benchmark.run data=latents data.root={out} "
          f"data.options.decoder=sd-vae data.options.vae={config.vae}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    from benchmark.cli import entry

    def body(argv: list[str]) -> int:
        encode(*parse_args(argv))
        return 0

    return entry(body, argv, help_text, interrupted="interrupted: rerun the same command to resume "
                 "(finished shards are kept)")


if __name__ == "__main__":
    sys.exit(main())
