"""The built-in latent codec: diffusers' ``AutoencoderKL`` (Stable Diffusion's VAE), local
weights only.

Images are float (N, 3, H, W) in [-1, 1] (the suite's image range, which is also what the
SD-VAE was trained on); latents are the autoencoder's raw posterior, *unscaled* (N, C, H/f,
W/f) with f = 2^(len(block_out_channels) - 1) (8 for SD-VAE: 256x256x3 <-> 32x32x4).  The
model trains on ``latents * scale`` (``scale_factor`` in the VAE's config: 0.18215 for
SD-VAE), which ``benchmark.encode`` records in the shards and the latents loader applies.

Weights are found by :mod:`benchmark.vae_weights` (torch-free, also used by the planner)
and loaded with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``: nothing is downloaded.
A model is loaded once per process and path (``functools.cache``).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from benchmark.schema import UserError
from benchmark.vae_weights import CONFIG_NAME, WEIGHTS_NAME, locate_vae, vae_config

CODEC_BATCH = 32  # images per autoencoder call: bounds activation memory (SD-VAE at 256^2)


@functools.cache
def load_vae(configured: str, key: str = "data.options.vae"):
    """The ``AutoencoderKL`` at ``configured`` (a folder or a .safetensors file), in eval mode
    on the CPU, float32.  UserError (one line) when it is absent or does not load."""
    files = locate_vae(configured, key)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: local_files_only below
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "accelerate not found" and similar notices
    with tempfile.TemporaryDirectory(prefix="fewstep-vae-") as folder:
        # from_pretrained reads one layout (config.json + diffusion_pytorch_model.safetensors)
        # and converts older checkpoints' parameter names; a bare file is linked into it.
        staged = Path(folder)
        (staged / CONFIG_NAME).write_text(json.dumps(vae_config(files)))
        (staged / WEIGHTS_NAME).symlink_to(files.weights)
        try:
            vae = AutoencoderKL.from_pretrained(str(staged), local_files_only=True, use_safetensors=True,
                                                low_cpu_mem_usage=False, torch_dtype=torch.float32)
        except Exception as err:  # a config that does not build, weights of another shape
            first = (str(err).strip().splitlines() or ["no message"])[0][:200]
            raise UserError(f"{key}={configured!r} does not load as an AutoencoderKL "
                            f"({type(err).__name__}: {first}); expected diffusers' AutoencoderKL "
                            f"weights with their {CONFIG_NAME}") from None
    return vae.eval().requires_grad_(False)


def downsampling(vae) -> int:
    """The spatial factor f between images and latents (8 for SD-VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _on(vae, device: torch.device):
    return vae.to(device) if next(vae.parameters()).device != device else vae


@torch.no_grad()
def encode_images(vae, images: Tensor, noise: Tensor | None = None, batch: int = CODEC_BATCH) -> Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> unscaled latents (N, C, H/f, W/f), float32.

    ``noise=None`` returns the posterior mean; otherwise ``mean + std * noise`` with
    ``noise`` (N, C, H/f, W/f) standard normal (one seeded posterior sample per image).
    """
    vae = _on(vae, images.device)
    out = []
    for lo in range(0, len(images), batch):
        posterior = vae.encode(images[lo:lo + batch].float()).latent_dist
        if noise is None:
            out.append(posterior.mean)
        else:
            out.append(posterior.mean + posterior.std * noise[lo:lo + batch].to(posterior.mean))
    return torch.cat(out).float()


@torch.no_grad()
def decode_latents_to_images(vae, latents: Tensor) -> Tensor:
    """Unscaled latents (N, C, h, w) -> images (N, 3, f h, f w) in [-1, 1], float32."""
    vae = _on(vae, latents.device)
    parts = [vae.decode(latents[lo:lo + CODEC_BATCH].float()).sample.clamp(-1, 1)
             for lo in range(0, len(latents), CODEC_BATCH)]
    return torch.cat(parts).float()


def sd_vae_decoder(configured: str):
    """The ``sd-vae`` decode hook for ``data.options.vae=<configured>``: unscaled latents ->
    images in [-1, 1] (the model is loaded on first use)."""
    if not configured:
        locate_vae(configured)  # raises the one-line "is not set" error

    def decode(latents: Tensor) -> Tensor:
        return decode_latents_to_images(load_vae(configured), latents)

    return decode
