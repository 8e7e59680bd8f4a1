"""One forward-mode JVP through a backbone, shared by MeanFlow, iMF and sCM.

A true Jacobian-vector product (forward-mode AD), never the VJP-with-ones trick that
only holds for elementwise networks (docs/methods.md §6.7).  One pass yields the primal output
and its directional derivative; with ``primal_grad=True`` the primal stays on the
autograd graph so the loss can backpropagate through it without a second full forward.

A backbone may provide its own ``jvp(x, cond, y, x_tangent, cond_tangents, return_aux)``
(a hand-written forward-mode pass whose tangent path does not record autograd); when it
does, it is used, otherwise ``torch.func.jvp``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


def backbone_jvp(
    net: nn.Module,
    x: Tensor,
    cond: dict[str, Tensor],
    y: Tensor,
    x_tangent: Tensor,
    cond_tangents: dict[str, Tensor | float],
    *,
    return_aux: bool = False,
    primal_grad: bool = True,
) -> tuple[Tensor, Tensor] | tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(net(x, cond, y), d/de net(x + e x_tangent, cond + e cond_tangents, y) at e = 0).

    ``cond_tangents`` maps slot -> tangent (a (B,) tensor or a float broadcast to (B,));
    slots left out get tangent 0.  The returned tangent is detached (every method uses it
    inside a stop-gradient target).  With ``return_aux`` both the main and the auxiliary
    output are returned with their tangents: ``((out, aux), (d_out, d_aux))``.
    """
    keys = tuple(cond)
    unknown = set(cond_tangents) - set(keys)
    if unknown:
        raise ValueError(f"tangent given for slot(s) {sorted(unknown)} not in cond {keys}")
    tangents = tuple(_as_tangent(cond_tangents.get(k, 0.0), cond[k]) for k in keys)
    grad_ctx = contextlib.nullcontext() if primal_grad else torch.no_grad()
    with grad_ctx:
        own = getattr(net, "jvp", None)
        if callable(own):
            primal, tangent = own(x, cond, y, x_tangent, dict(zip(keys, tangents)), return_aux)
        else:
            def fn(x_: Tensor, *c: Tensor):
                c_ = dict(zip(keys, c))
                return net(x_, c_, y, return_aux=True) if return_aux else net(x_, c_, y)

            primal, tangent = torch.func.jvp(fn, (x, *(cond[k] for k in keys)), (x_tangent, *tangents))
    # under bf16 autocast the passes run in bf16; the tangent returns in the input's dtype
    # (float32), so the methods' targets are formed in float32
    if return_aux:
        return primal, (tangent[0].detach().to(x.dtype), tangent[1].detach().to(x.dtype))
    return primal, tangent.detach().to(x.dtype)


def _as_tangent(value: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(like.dtype).expand_as(like)
    return torch.full_like(like, float(value))
