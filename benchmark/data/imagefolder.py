"""An image folder with one subfolder per class (torchvision's ``ImageFolder`` layout)::

    <root>/<class_a>/xxx.png
    <root>/<class_a>/nested/xxy.jpg
    <root>/<class_b>/123.png

Classes are the subfolder names in sorted order (labels ``0..K-1``), files are found by
``torchvision.datasets.ImageFolder`` (its extensions: jpg, jpeg, png, ppm, bmp, pgm, tif,
tiff, webp), and every image is read once into memory as uint8, then scaled to float32 in
[-1, 1] by ``x / 127.5 - 1``.  The whole folder is the training split (there is no test
split: the metrics compare against it).

Sizes: with ``resolution=0`` (default) every image must already be square and of one size;
with ``resolution=R`` each image is resized (bicubic) so its shorter side is R, then
centre-cropped to R x R (the usual ImageNet preprocessing of generative models).
``channels=3`` converts to RGB, ``channels=1`` to grey.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmark.catalog import check_data_root, data_root_error
from benchmark.data.base import Dataset, fingerprint_dataset
from benchmark.schema import UserError

RECIPE_VERSION = 1  # bump when resizing, cropping or scaling change


def load_imagefolder(root: str = "", resolution: int = 0, channels: int = 3) -> Dataset:
    """Images (N, channels, R, R) float32 in [-1, 1] and labels (N,) from class subfolders."""
    if not isinstance(resolution, int) or resolution < 0:
        raise UserError(f"data.options.resolution={resolution!r} is invalid; expected 0 (keep "
                        "the native size) or a positive side length such as 32")
    if channels not in (1, 3):
        raise UserError(f"data.options.channels={channels!r} is invalid; expected 3 (RGB) or 1 (grey)")
    base = check_data_root("imagefolder", root)
    classes, samples = discover_images(base, root)
    arrays = [_read(Path(path), base, root, resolution, channels) for path, _ in samples]
    for array, (path, _) in zip(arrays, samples):
        if array.shape != arrays[0].shape:  # np.stack needs one size: name the first outlier
            side = arrays[0].shape[-1]
            raise UserError(data_root_error(
                "imagefolder", root, f"holds {Path(path).relative_to(base)} of {array.shape[-1]}x"
                f"{array.shape[-2]} pixels while {Path(samples[0][0]).relative_to(base)} has "
                f"{side}x{side}; expected one size: add data.options.resolution=<side> to resize and crop"))
    images = np.stack(arrays)
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    recipe = {"name": "imagefolder", "version": RECIPE_VERSION, "resolution": resolution,
              "channels": channels, "classes": classes, "scaling": "x/127.5-1"}
    return Dataset(
        name="imagefolder",
        shape=tuple(images.shape[1:]),
        num_classes=len(classes),
        train_x=torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0),
        train_y=torch.from_numpy(labels),
        test_x=None, test_y=None,
        fingerprint=fingerprint_dataset(recipe, torch.from_numpy(images), torch.from_numpy(labels)),
        params={"recipe": recipe, "range": [-1.0, 1.0], "root": str(base), "classes": classes},
    )


def discover_images(base: Path, root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (path, label) pairs, as torchvision's ImageFolder finds them."""
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(base), loader=lambda path: path)  # list only; we read below
    except (FileNotFoundError, OSError) as err:  # no class folder, or a class without images
        raise UserError(data_root_error("imagefolder", root, str(err).strip().splitlines()[0].rstrip("."))) from None
    return list(folder.classes), [(str(p), int(y)) for p, y in folder.samples]


def _read(path: Path, base: Path, root: str, resolution: int, channels: int) -> np.ndarray:
    """One image file -> uint8 (channels, H, W), resized and centre-cropped if asked."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            if resolution:
                img = _resize_center_crop(img, resolution)
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(data_root_error("imagefolder", root, f"holds {path.relative_to(base)}, which "
                                        f"is not a readable image ({type(err).__name__})")) from None
    array = np.asarray(img, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if array.shape[1] != array.shape[2]:
        raise UserError(data_root_error("imagefolder", root, f"holds {path.relative_to(base)} of "
                                        f"{array.shape[2]}x{array.shape[1]} pixels, not square; "
                                        f"add data.options.resolution=<side> to resize and crop"))
    return array


def _resize_center_crop(img, side: int):
    """Bicubic resize so the shorter side is ``side``, then the centred side x side crop."""
    from PIL import Image

    scale = side / min(img.size)
    width, height = max(side, round(img.size[0] * scale)), max(side, round(img.size[1] * scale))
    img = img.resize((width, height), resample=Image.BICUBIC)
    left, top = (width - side) // 2, (height - side) // 2
    return img.crop((left, top, left + side, top + side))
