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
Those kernels are ATen internals, not public API: each has a public-operator formula
used when a torch build lacks it (``FUSED = False`` forces it; the tests run both).

Convention: ``x`` is a primal and ``dx`` its tangent, of the same shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------
# Tangent-only pieces (call under torch.no_grad())


def _aten(name: str):
    """A fused ATen backward kernel of this torch build, or None.  These are not public
    API: each tangent below has a formula in public operators that is used when the
    kernel is missing (or ``FUSED = False``), and the tests check both agree."""
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None


_GELU_BACKWARD, _SILU_BACKWARD = _aten("gelu_backward"), _aten("silu_backward")
_SOFTMAX_BACKWARD = _aten("_softmax_backward_data")
FUSED = True
"""Use the fused kernels where this torch has them (faster; the public formulas agree to
rounding, tests/test_backbone_jvp.py)."""


def activation_tangent(activation: nn.Module, z: Tensor, dz: Tensor) -> Tensor:
    """act'(z) * dz for the elementwise activations the backbones use (SiLU, GELU)."""
    if isinstance(activation, nn.SiLU):
        return silu_tangent(z, dz)
    if isinstance(activation, nn.GELU):
        return gelu_tangent(z, dz, activation.approximate)
    raise TypeError(f"no tangent rule for activation {type(activation).__name__}")


def gelu_tangent(z: Tensor, dz: Tensor, approximate: str = "none") -> Tensor:
    """gelu'(z) * dz (exact or tanh-approximate GELU)."""
    if FUSED and _GELU_BACKWARD is not None:
        return _GELU_BACKWARD(dz, z, approximate=approximate)
    if approximate == "tanh":
        k = math.sqrt(2 / math.pi)
        th = torch.tanh(k * (z + 0.044715 * z**3))
        return dz * (0.5 * (1 + th) + 0.5 * z * (1 - th * th) * k * (1 + 3 * 0.044715 * z * z))
    return dz * (0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))


def silu_tangent(z: Tensor, dz: Tensor) -> Tensor:
    """silu'(z) * dz, any shape: silu' = s (1 + z (1 - s)), s = sigmoid(z)."""
    if FUSED and _SILU_BACKWARD is not None:
        return _SILU_BACKWARD(dz, z)
    s = torch.sigmoid(z)
    return dz * s * (1 + z * (1 - s))


def softmax_tangent(weights: Tensor, d_scores: Tensor) -> Tensor:
    """Tangent of P = softmax(S, -1): dP = P * (dS - sum(P * dS, -1))."""
    if FUSED and _SOFTMAX_BACKWARD is not None:
        return _SOFTMAX_BACKWARD(d_scores, weights, -1, weights.dtype)
    return weights * (d_scores - (weights * d_scores).sum(-1, keepdim=True))


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
    if FUSED and hasattr(torch, "native_layer_norm"):
        # native_layer_norm is what F.layer_norm runs; it also hands back rstd
        y, _, rstd = torch.native_layer_norm(x, norm.normalized_shape, None, None, norm.eps)
    else:
        y = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
        with torch.no_grad():
            rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
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
