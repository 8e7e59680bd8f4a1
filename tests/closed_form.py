"""Closed-form fields for Gaussian data x ~ N(mu, s^2) per dimension (docs/methods.md §7).

Each function works elementwise on tensors and is written in the convention it names.
Suite convention (FM, MeanFlow, iMF): z_t = (1 - t) x + t eps, t = 1 is noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# -- suite convention: t = 1 noise -----------------------------------------------------------


def sigma_fm(t: Tensor, s: float) -> Tensor:
    """Std of z_t: sqrt((1-t)^2 s^2 + t^2)."""
    return torch.sqrt((1 - t) ** 2 * s**2 + t**2)


def velocity(z: Tensor, t: Tensor, mu: float, s: float) -> Tensor:
    """Marginal velocity v(z, t) = E[eps - x | z_t = z]."""
    return -mu + (t - (1 - t) * s**2) / sigma_fm(t, s) ** 2 * (z - (1 - t) * mu)


def average_velocity(z: Tensor, r: Tensor, t: Tensor, mu: float, s: float) -> Tensor:
    """MeanFlow average velocity u(z, r, t) = (z_t - z_r) / (t - r) along the flow; -> v as r -> t."""
    ratio = sigma_fm(r, s) / sigma_fm(t, s)
    gap = t - r
    safe = torch.where(gap.abs() < 1e-8, torch.ones_like(gap), gap)
    u = -mu + (1 - ratio) * (z - (1 - t) * mu) / safe
    return torch.where(gap.abs() < 1e-8, velocity(z, t, mu, s), u)


def flow_map(z: Tensor, t: Tensor, r: Tensor, mu: float, s: float) -> Tensor:
    """psi_{t->r}(z) = m_r + (sigma_r / sigma_t)(z - m_t), the exact ODE map from t to r."""
    return (1 - r) * mu + sigma_fm(r, s) / sigma_fm(t, s) * (z - (1 - t) * mu)


# -- Shortcut convention: x_t = (1 - t) noise + t data, t = 0 noise ----------------------------


def sigma_shortcut(t: Tensor, s: float) -> Tensor:
    return torch.sqrt((1 - t) ** 2 + t**2 * s**2)


def shortcut_target(x: Tensor, t: Tensor, d: Tensor, mu: float, s: float) -> Tensor:
    """s*(x, t, d) = mu + (sigma_{t+d}/sigma_t - 1)(x - t mu)/d, so x_{t+d} = x_t + d s*."""
    return mu + (sigma_shortcut(t + d, s) / sigma_shortcut(t, s) - 1) * (x - t * mu) / d


# -- TrigFlow (sCM): x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2), t = pi/2 noise -------------


def sigma_trig(t: Tensor, s: float, sigma_d: float) -> Tensor:
    return torch.sqrt(torch.cos(t) ** 2 * s**2 + torch.sin(t) ** 2 * sigma_d**2)


def consistency_fn(x: Tensor, t: Tensor, mu: float, s: float, sigma_d: float) -> Tensor:
    """f*(x, t) = mu + (s / sigma_t)(x - cos t mu): the exact map from x_t to its data end."""
    return mu + s / sigma_trig(t, s, sigma_d) * (x - torch.cos(t) * mu)


def trigflow_F(x: Tensor, t: Tensor, mu: float, s: float, sigma_d: float) -> Tensor:
    """F* with f = cos t x - sin t sigma_d F, i.e. F* = (cos t x - f*) / (sin t sigma_d)."""
    return (torch.cos(t) * x - consistency_fn(x, t, mu, s, sigma_d)) / (torch.sin(t) * sigma_d)


def trigflow_velocity(x: Tensor, t: Tensor, mu: float, s: float, sigma_d: float) -> Tensor:
    """PF-ODE dx/dt = -sin t mu + [cos t sin t (sigma_d^2 - s^2) / sigma_t^2](x - cos t mu)."""
    var = sigma_trig(t, s, sigma_d) ** 2
    return -torch.sin(t) * mu + torch.cos(t) * torch.sin(t) * (sigma_d**2 - s**2) / var * (
        x - torch.cos(t) * mu
    )


HALF_PI = math.pi / 2
