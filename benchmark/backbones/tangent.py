"""Hand-written forward-mode AD for the backbones' layers: (primal, tangent) pairs.

A ``*_with_tangent`` helper computes the primal with exactly the ops of the layer's
``forward``, in the ambient grad mode (so it stays on the autograd graph, bitwise equal
to ``forward``), and the tangent -- the directional derivative along the input tangent --
under ``torch.no_grad()``, from the primal's own intermediates (activations, softmax
weights, normalisation statistics).  A ``*_tangent`` helper computes a tangent only and
must be called under ``torch.no_grad()``.

Why not ``torch.func.jvp``: it records every tangent op for autograd (the JVP-based
methods use the tangent only inside a stop-gradient target) and pays forward-AD dispatch
on each op; here a tangent op is one plain kernel, often a fused backward kernel
(``gelu_backward(dz, z) = gelu'(z) dz``, ``_softmax_backward_data(dS, P) = P (dS - <P, dS>)``).

Convention: ``x`` is a primal and ``dx`` its tangent, of the same shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------
# Tangent-only pieces (call under torch.no_grad())


def activation_tangent(activation: nn.Module, z: Tensor, dz: Tensor) -> Tensor:
    """act'(z) * dz for the elementwise activations the backbones use (SiLU, GELU)."""
    if isinstance(activation, nn.SiLU):
        return silu_tangent(z, dz)
    if isinstance(activation, nn.GELU):
        return torch.ops.aten.gelu_backward(dz, z, approximate=activation.approximate)
    raise TypeError(f"no tangent rule for activation {type(activation).__name__}")


def silu_tangent(z: Tensor, dz: Tensor) -> Tensor:
    """silu'(z) * dz, any shape."""
    return torch.ops.aten.silu_backward(dz, z)


def softmax_tangent(weights: Tensor, d_scores: Tensor) -> Tensor:
    """Tangent of P = softmax(S, -1): dP = P * (dS - sum(P * dS, -1)) (one fused kernel)."""
    return torch._softmax_backward_data(d_scores, weights, -1, weights.dtype)


def modulation_tangent(
    x: Tensor, dx: Tensor, one_plus_scale: Tensor, d_scale: Tensor, d_shift: Tensor
) -> Tensor:
    """Tangent of x * (1 + scale) + shift: dx (1 + scale) + x dscale + dshift (broadcast)."""
    return torch.addcmul(d_shift, x, d_scale).addcmul_(dx, one_plus_scale)


def sinusoidal_tangent(features: Tensor, ds: Tensor, max_period: float = 10_000.0) -> Tensor:
    """Tangent of ``embed.sinusoidal``: features (B, dim) = [cos(s w), sin(s w)(, 0)] of
    s (B,) with tangent ds (B,) -> (B, dim) = [-w sin(s w), w cos(s w)(, 0)] ds.

    Reuses the primal features (their halves are the sin and cos needed); the
    frequencies w are rebuilt in the dtype ``sinusoidal`` computes them in."""
    dim = features.shape[-1]
    half = dim // 2
    dtype = features.dtype if features.dtype == torch.float64 else torch.float32
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=dtype, device=features.device) / half
    ).to(features.dtype)
    cos, sin = features[:, :half], features[:, half : 2 * half]
    d = torch.cat([-sin * freqs, cos * freqs], dim=-1) * ds.to(features.dtype)[:, None]
    if dim % 2:
        d = torch.cat([d, torch.zeros_like(d[:, :1])], dim=-1)
    return d


# ----------------------------------------------------------------------------------------
# Primal and tangent together


def layer_with_tangent(layer: nn.Module, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    """(layer(x), tangent) for a Linear (dx W^T: the bias is constant) or an activation."""
    y = layer(x)
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            dy = F.linear(dx, layer.weight)
        else:
            dy = activation_tangent(layer, x, dx)
    return y, dy


def silu_with_tangent(z: Tensor, dz: Tensor) -> tuple[Tensor, Tensor]:
    """(silu(z), silu'(z) dz), any shape."""
    out = F.silu(z)
    with torch.no_grad():
        return out, silu_tangent(z, dz)


def sequential_with_tangent(layers: nn.Sequential, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    """(layers(x), tangent) through a Sequential of Linear / SiLU / GELU layers."""
    for layer in layers:
        x, dx = layer_with_tangent(layer, x, dx)
    return x, dx


def layer_norm_with_tangent(norm: nn.LayerNorm, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    """(norm(x), tangent) for a LayerNorm over the last dim without affine: with
    y = (x - mean) * rstd, dy = rstd (dx - mean(dx) - y mean(y dx))."""
    if norm.weight is not None or len(norm.normalized_shape) != 1:
        raise ValueError("layer_norm_with_tangent supports last-dim LayerNorm without affine")
    # native_layer_norm is what F.layer_norm runs; it also hands back rstd
    y, _, rstd = torch.native_layer_norm(x, norm.normalized_shape, None, None, norm.eps)
    with torch.no_grad():
        mean_dx = dx.mean(-1, keepdim=True)
        mean_ydx = (y * dx).mean(-1, keepdim=True)
        dy = (dx - torch.addcmul(mean_dx, y, mean_ydx)).mul_(rstd)
    return y, dy


def scalar_embedder_with_tangent(
    embedder: nn.Module, features: Tensor, ds: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """(embedder.mlp(features), tangent) for an ``embed.ScalarEmbedder`` fed its sinusoidal
    ``features`` (B, freq_dim) of a scalar with tangent ds (B,); ds None: primal only,
    tangent None (the slot has no tangent)."""
    if ds is None:
        return embedder.mlp(features), None
    with torch.no_grad():
        d_features = embedder.features_tangent(features, ds)
    return sequential_with_tangent(embedder.mlp, features, d_features)
