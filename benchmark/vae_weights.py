"""Find an AutoencoderKL's weights on disk, never over the network.  Torch-free.

The built-in ``sd-vae`` latent codec (``benchmark.data.vae``) reads diffusers'
``AutoencoderKL`` from a local path given as ``data.options.vae`` (training and evaluation)
or ``vae=`` (``benchmark.encode``).  Two layouts are accepted, both safetensors only (a
pickle can run code when loaded):

- a folder as diffusers' ``save_pretrained`` writes it (and as the Hugging Face repository
  ``stabilityai/sd-vae-ft-mse`` holds it): ``config.json`` and
  ``diffusion_pytorch_model.safetensors``;
- a single ``.safetensors`` file with diffusers' parameter names; its architecture is read
  from a ``config.json`` beside it, or is Stable Diffusion's KL-f8 autoencoder
  (:data:`SD_VAE_CONFIG`, the architecture of every SD 1.x/2.x VAE) when there is none.

The planner calls :func:`vae_identity` before anything trains, so a missing or incomplete
path is one :class:`~benchmark.schema.UserError` at planning time, and an evaluation key
changes with the weights' bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from benchmark.schema import UserError

VAE_DECODERS = ("sd-vae",)
"""Latent decoders that read an autoencoder from ``data.options.vae``."""
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
SD_VAE_URL = "https://huggingface.co/stabilityai/sd-vae-ft-mse"

SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32,
    "sample_size": 256, "scaling_factor": 0.18215,
}
"""Stable Diffusion's KL-f8 autoencoder (stabilityai/sd-vae-ft-mse's config.json): 256x256x3
images <-> 32x32x4 latents, scale factor 0.18215."""


@dataclass(frozen=True)
class VaeFiles:
    weights: Path        # the .safetensors file
    config: Path | None  # its config.json, or None for the built-in SD-VAE config


def _missing(key: str, configured: str, problem: str) -> UserError:
    return UserError(
        f"{key}={configured!r} {problem}; expected a local AutoencoderKL: a folder with "
        f"{CONFIG_NAME} and {WEIGHTS_NAME} (diffusers' save_pretrained layout) or one .safetensors "
        f"file: on a machine with internet download {SD_VAE_URL} (those two files) and pass its "
        f"folder; nothing is downloaded at run time")


def locate_vae(configured: str, key: str = "data.options.vae") -> VaeFiles:
    """The weights (and config) ``configured`` names; UserError (one line) when absent."""
    if not configured:
        raise _missing(key, configured, "is not set")
    path = Path(configured).expanduser()
    if path.is_dir():
        weights, config = path / WEIGHTS_NAME, path / CONFIG_NAME
        if not weights.is_file():
            safetensors = sorted(path.glob("*.safetensors"))
            if len(safetensors) != 1:
                raise _missing(key, configured, f"holds no {WEIGHTS_NAME}")
            weights = safetensors[0]
        if not config.is_file():
            raise _missing(key, configured, f"holds no {CONFIG_NAME}")
        return VaeFiles(weights.resolve(), config.resolve())
    if path.is_file():
        if path.suffix != ".safetensors":
            raise _missing(key, configured, f"is a {path.suffix or 'suffix-less'} file, not .safetensors")
        config = path.parent / CONFIG_NAME
        return VaeFiles(path.resolve(), config.resolve() if config.is_file() else None)
    raise _missing(key, configured, "does not exist")


def vae_config(files: VaeFiles) -> dict:
    """The autoencoder's diffusers config (the built-in SD-VAE one for a bare file)."""
    if files.config is None:
        return dict(SD_VAE_CONFIG)
    try:
        config = json.loads(files.config.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{files.config} is not readable JSON ({type(err).__name__}); expected "
                        f"diffusers' AutoencoderKL {CONFIG_NAME}") from None
    if not isinstance(config, dict) or config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise UserError(f"{files.config} is not an AutoencoderKL config (_class_name="
                        f"{config.get('_class_name') if isinstance(config, dict) else None!r}); "
                        f"expected diffusers' AutoencoderKL {CONFIG_NAME}")
    return config


def vae_identity(configured: str, key: str = "data.options.vae") -> str:
    """16 hex characters of sha256 over the weights' bytes and the config: what names the
    autoencoder in evaluation keys and in the latent shards' manifest."""
    from benchmark.metrics.inception import file_digest

    files = locate_vae(configured, key)
    config = json.dumps(vae_config(files), sort_keys=True)
    return hashlib.sha256(f"{file_digest(files.weights)}|{config}".encode()).hexdigest()[:16]
