"""Features of images for the fid suite: one interface, two backends, pluggable networks.

Both backends (``eval.backend``) are fed the same samples:

1. samples (N, C, H, W) in [-1, 1] (latents are decoded first by the dataset's decode hook)
   are clipped and quantised to uint8 by ``round((x + 1) * 127.5)``, as if saved as PNGs;
2. the backend turns the uint8 images into features (N, D) in batches, with a progress bar:
   - ``torch-fidelity``: its registered feature extractor (``create_feature_extractor``)
     over a dataset of uint8 tensors (``get_featuresdict_from_dataset``);
   - ``clean-fid``: its generator path (``cleanfid.fid.get_model_features``), replaying our
     images as float [0, 255] in the same order, with its resizer and feature model.


Feature networks (``eval.extractor``, :data:`EXTRACTORS`):

- ``inception-v3``: the standard FID network.  torch-fidelity runs ``inception-v3-compat``
  (resize to 299 with its TF1-compatible bilinear interpolation of the uint8 image, then
  ``(x - 128) / 128``; the 2048-d pool3 features); clean-fid runs NVlabs' TorchScript
  Inception in its ``clean`` mode (PIL bicubic resize of each float channel to 299, no
  re-quantisation; the 2048-d pool features).  Grey images are repeated to 3 channels.
  Both read their weights from disk only (``benchmark.metrics.inception``).
- ``digits``: the 64-d penultimate layer of the digits classifier (8x8 grey images only);
  see ``benchmark.metrics.digits``.  Not an Inception FID.
- ``pixels``: no network: each channel average-pooled to at most 8x8 and scaled to [0, 1],
  flattened (C * 64 features).  A weight-free path for tests and smoke runs.

The metrics on these features (FD, KID, precision/recall) are in
:mod:`benchmark.metrics.fid`; the real data's features, cached, in
:mod:`benchmark.metrics.reference`.  Both import this module (neither imports the other
back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from torch import Tensor
from torch.nn import functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from benchmark.data import Dataset
from benchmark.metrics.inception import file_digest, locate_inception_weights
from benchmark.schema import UserError

BACKENDS = ("torch-fidelity", "clean-fid")
PIXELS_SIDE = 8
DECODE_CHUNK = 1024  # samples decoded and featurised at a time (bounds image memory: 0.8 GB at 256^2)
PIXELS_ID = "fewstep-pixels8-v1"
"""Name of the pixels extractor in torch-fidelity's registry (bump if its features change)."""


@dataclass(frozen=True)
class FidOptions:
    """How to measure: the ``eval`` fields of the fid suite (see ``benchmark.schema``)."""

    backend: str = "torch-fidelity"
    extractor: str = "inception-v3"
    inception_weights: str = ""      # a file or folder; "" = the libraries' usual locations
    reference_split: str = "train"
    reference: str = ""              # an ADM reference batch .npz instead of the split
    num_reference: int = 50000
    precision_recall: bool = False
    batch_size: int = 64             # images per feature batch
    progress: bool = True
    seed: int = 2024                 # KID subsets, reference subset of a larger split

    @classmethod
    def from_eval_config(cls, cfg: Any) -> FidOptions:
        return cls(backend=cfg.backend, extractor=cfg.extractor, inception_weights=cfg.inception_weights,
                   reference_split=cfg.reference_split, reference=cfg.reference,
                   num_reference=cfg.num_reference,
                   precision_recall=cfg.precision_recall, batch_size=cfg.feature_batch_size,
                   progress=cfg.progress, seed=cfg.seed)


# ----------------------------------------------------------------------------------------
# Images as every feature network sees them.


def quantise(images: Tensor) -> Tensor:
    """Float images (N, C, H, W), clipped to [-1, 1] -> uint8 (N, C, H, W) in 0..255."""
    return torch.round((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)


def check_images(images: Tensor, what: str) -> None:
    """A finite float batch (N >= 2, C, H, W), or one clear ValueError."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{what} have shape {shape}; expected images (N, C, H, W) in [-1, 1]")
    if len(images) < 2:
        raise ValueError(f"{what} hold {len(images)} image(s); FD and KID need at least 2")
    bad = (~torch.isfinite(images)).sum().item()
    if bad:
        raise ValueError(f"{what} hold {bad} NaN/inf value(s); expected finite images in "
                         "[-1, 1] (a diverged sampler?)")


# ----------------------------------------------------------------------------------------
# Feature networks: one class per extractor, each says how both backends run it.


class Extractor:
    """A feature network as both backends run it.

    ``adapt`` maps uint8 (N, C, H, W) to what the network takes (or raises UserError);
    ``torch_fidelity`` gives the registered name, feature layer and constructor kwargs;
    ``clean_fid`` gives a feature model ``float (B, C, H, W) in [0, 255] -> (B, D)`` and
    the per-image resizer (``None`` = images as they are); ``identity`` names network and
    weights in reference cache keys.
    """

    name = ""

    def __init__(self, options: FidOptions, cache_dir: Path, device: torch.device) -> None:
        self.options, self.cache_dir, self.device = options, cache_dir, device
        self.networks: dict[str, tuple] = {}  # per backend: built once, reused for every batch set

    def adapt(self, images: Tensor) -> Tensor:
        return images

    def identity(self) -> str:
        raise NotImplementedError

    def torch_fidelity(self) -> tuple[str, str, dict]:
        raise NotImplementedError

    def clean_fid(self) -> tuple[Callable[[Tensor], Tensor], Callable | None]:
        raise NotImplementedError


class PixelsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor: uint8 (B, C, H, W) -> (B, C * 64) pooled pixels in [0, 1]."""

    def __init__(self, name: str, features_list: list[str], **kwargs: object) -> None:
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("pixels",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "pixels"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, PIXELS_SIDE, PIXELS_SIDE, dtype=torch.uint8)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return (pixel_features(images.float()),)


def pixel_features(images: Tensor) -> Tensor:
    """float (B, C, H, W) in [0, 255] -> (B, C * s * s), s = min(H, 8), area-pooled, in [0, 1]."""
    side = min(images.shape[-1], PIXELS_SIDE)
    return F.adaptive_avg_pool2d(images / 255.0, side).flatten(1)


if PIXELS_ID not in FEATURE_EXTRACTORS_REGISTRY:  # re-imports must not re-register
    torch_fidelity.register_feature_extractor(PIXELS_ID, PixelsFeatureExtractor)


class PixelsExtractor(Extractor):
    name = "pixels"

    def identity(self) -> str:
        return PIXELS_ID

    def torch_fidelity(self) -> tuple[str, str, dict]:
        return PIXELS_ID, "pixels", {}

    def clean_fid(self) -> tuple[Callable[[Tensor], Tensor], Callable | None]:
        return pixel_features, None


class DigitsExtractor(Extractor):
    """The digits classifier's standardised 64-d penultimate features (8x8 grey only)."""

    name = "digits"

    def adapt(self, images: Tensor) -> Tensor:
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise UserError(f"eval.extractor=digits reads 8x8 grey images but the samples are "
                            f"{tuple(images.shape[1:])}; expected eval.extractor=inception-v3 or pixels")
        return images

    def identity(self) -> str:
        from benchmark.metrics import FEATURE_EXTRACTOR_ID

        return FEATURE_EXTRACTOR_ID

    def torch_fidelity(self) -> tuple[str, str, dict]:
        from benchmark.metrics.digits import FEATURE_LAYER, classifier_path, load_classifier

        load_classifier(self.cache_dir)  # trains it on a cache miss (~10 s)
        return self.identity(), FEATURE_LAYER, {
            "feature_extractor_weights_path": str(classifier_path(self.cache_dir))}

    def clean_fid(self) -> tuple[Callable[[Tensor], Tensor], Callable | None]:
        from benchmark.metrics.digits import load_classifier

        net = load_classifier(self.cache_dir).to(self.device)
        return lambda x: net.features(x / 127.5 - 1), None  # DigitsFeatureExtractor's dequantise


class InceptionExtractor(Extractor):
    """Inception-v3 pool features (2048-d); weights from disk only."""

    name = "inception-v3"

    def __init__(self, options: FidOptions, cache_dir: Path, device: torch.device) -> None:
        super().__init__(options, cache_dir, device)
        self.weights = locate_inception_weights(options.backend, options.inception_weights)

    def adapt(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:  # grey: the network reads RGB
            return images.expand(-1, 3, -1, -1).contiguous()
        if images.shape[1] != 3:
            raise UserError(f"eval.extractor=inception-v3 reads RGB or grey images but the samples "
                            f"have {images.shape[1]} channels; expected data.options.decoder=<a "
                            f"registered decoder> for latents, or eval.extractor=pixels")
        return images

    def identity(self) -> str:
        return f"inception-v3-{self.options.backend}-{file_digest(self.weights)[:16]}"

    def torch_fidelity(self) -> tuple[str, str, dict]:
        self._check_state_dict()
        return "inception-v3-compat", "2048", {"feature_extractor_weights_path": str(self.weights)}

    def clean_fid(self) -> tuple[Callable[[Tensor], Tensor], Callable | None]:
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        try:  # download=False: the file was found above, clean-fid must not fetch it
            model = InceptionV3W(str(self.weights.parent), download=False, resize_inside=False)
        except Exception as err:  # not TorchScript, or not NVlabs' layout
            raise UserError(f"eval.inception_weights: {self.weights} is unreadable "
                            f"({type(err).__name__}); expected clean-fid's TorchScript "
                            "inception-2015-12-05.pt: fetch it again") from None
        model = model.to(self.device).eval()
        return model, build_resizer("clean")

    def _check_state_dict(self) -> None:
        """torch-fidelity loads the file with weights_only=False; we open it first with
        weights_only=True, so a file holding pickled code is refused before it runs."""
        try:
            state = torch.load(self.weights, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UserError(f"Inception weights {self.weights} are unreadable as a plain state_dict "
                            f"({type(err).__name__}); expected torch-fidelity's "
                            "weights-inception-2015-12-05-6726825d.pth: fetch it again") from None
        if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
            raise UserError(f"Inception weights {self.weights} are not torch-fidelity's "
                            "inception-v3-compat state_dict (no Mixed_7c layers); expected "
                            "weights-inception-2015-12-05-6726825d.pth")


EXTRACTORS: dict[str, type[Extractor]] = {
    cls.name: cls for cls in (InceptionExtractor, DigitsExtractor, PixelsExtractor)}


def build_extractor(options: FidOptions, cache_dir: Path, device: torch.device) -> Extractor:
    if options.extractor not in EXTRACTORS:
        raise UserError(f"eval.extractor={options.extractor!r} is unknown; expected one of: "
                        f"{', '.join(EXTRACTORS)}")
    if options.backend not in BACKENDS:
        raise UserError(f"eval.backend={options.backend!r} is unknown; expected one of: "
                        f"{', '.join(BACKENDS)}")
    return EXTRACTORS[options.extractor](options, cache_dir, device)


# ----------------------------------------------------------------------------------------
# Backends: uint8 images -> features (N, D) float32.


class _Images(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) as a map-style dataset, one (C, H, W) tensor per item."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def features_torch_fidelity(images: Tensor, extractor: Extractor, *, batch_size: int,
                            progress: bool) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, D) through torch-fidelity's extractor and batching."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    cuda = extractor.device.type == "cuda"
    if "torch-fidelity" not in extractor.networks:
        name, layer, kwargs = extractor.torch_fidelity()
        extractor.networks["torch-fidelity"] = (
            create_feature_extractor(name, [layer], cuda=cuda, verbose=False, **kwargs), layer)
    network, layer = extractor.networks["torch-fidelity"]
    out = get_featuresdict_from_dataset(_Images(images), network, batch_size, cuda,
                                        save_cpu_ram=True, verbose=progress)
    return out[layer].numpy()


def features_clean_fid(images: Tensor, extractor: Extractor, *, batch_size: int,
                       progress: bool) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, D) through clean-fid's generator path: a replay 'generator'
    hands it our images as float [0, 255] in order (padding the last batch, which clean-fid
    trims), so its resizer and batching run exactly as for a model."""
    from cleanfid.fid import get_model_features

    if "clean-fid" not in extractor.networks:
        extractor.networks["clean-fid"] = extractor.clean_fid()
    model, resize = extractor.networks["clean-fid"]
    floats = images.float()
    cursor = [0]

    def replay(z: Tensor) -> Tensor:
        lo = cursor[0]
        cursor[0] += len(z)
        index = torch.arange(lo, lo + len(z)).clamp(max=len(floats) - 1)
        return floats[index]

    with torch.random.fork_rng(devices=[]):  # clean-fid draws (unused) z from the global RNG
        feats = get_model_features(
            replay, model, mode="clean", z_dim=1, num_gen=len(images), batch_size=batch_size,
            device=extractor.device, desc=f"clean-fid {extractor.name}", verbose=progress,
            custom_fn_resize=resize if resize is not None else (lambda image: image))
    return np.asarray(feats, dtype=np.float32)


FEATURE_BACKENDS: dict[str, Callable[..., np.ndarray]] = {
    "torch-fidelity": features_torch_fidelity,
    "clean-fid": features_clean_fid,
}


def image_features(images: Tensor, extractor: Extractor, options: FidOptions) -> np.ndarray:
    """Float images (N, C, H, W) in [-1, 1] -> features (N, D) float32 via ``options.backend``."""
    u8 = extractor.adapt(quantise(images))
    return FEATURE_BACKENDS[options.backend](u8, extractor, batch_size=options.batch_size,
                                             progress=options.progress)


def uint8_features(images: Tensor, extractor: Extractor, options: FidOptions) -> np.ndarray:
    """uint8 images (N, C, H, W) (a reference batch's) -> features (N, D) float32, taken
    ``DECODE_CHUNK`` at a time so a large batch is never held as a copy."""
    parts = [FEATURE_BACKENDS[options.backend](extractor.adapt(chunk.contiguous()), extractor,
                                               batch_size=options.batch_size, progress=options.progress)
             for chunk in images.split(DECODE_CHUNK)]
    return np.concatenate(parts)


def dataset_features(samples: Tensor, dataset: Dataset, extractor: Extractor,
                     options: FidOptions) -> np.ndarray:
    """Samples in the dataset's space (N, *dataset.shape) -> features (N, D) float32.

    Latents go through the dataset's decode hook first, ``DECODE_CHUNK`` at a time, so a
    large set of decoded images never sits in memory at once.
    """
    from benchmark.data.latents import decode_latents

    parts = []
    for chunk in samples.split(DECODE_CHUNK):
        with torch.no_grad():
            images = decode_latents(dataset, chunk.to(extractor.device)).float().cpu()
        if images.dim() != 4 or not torch.isfinite(images).all():
            raise ValueError(f"decoder {dataset.params.get('decoder')!r} gave {tuple(images.shape)} "
                             "images with NaN/inf or not (N, C, H, W); expected finite images in [-1, 1]")
        parts.append(image_features(images, extractor, options))
    return np.concatenate(parts)
