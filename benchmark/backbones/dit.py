"""Diffusion Transformer (DiT) backbone shared by every method, with two ways to condition.

Follows facebookresearch/DiT ``models.py`` (patchify, fixed 2-D sin-cos positions,
transformer blocks, final layer, unpatchify) with three changes the benchmark needs:

- scalar conditions are embedded raw (t in [0, 1], no x1000; docs/methods.md §6.6) and there
  may be several of them (``slots``: t, r, h, d, omega, t_min, t_max);
- ``conditioning_mode="in_context"`` replaces adaLN by iMF-style prefix tokens;
- attention is an explicit softmax by default, because the fused CPU/GPU SDPA kernels
  have no forward-mode AD for ``torch.func.jvp`` (docs/methods.md §6.1);
- ``DiT.jvp`` is a hand-written forward-mode pass (``benchmark/backbones/tangent.py``)
  that MeanFlow/iMF/sCM use through ``methods.jvp.backbone_jvp``: the primal is the
  ``forward`` output on the autograd graph, the tangent is computed beside it layer by
  layer without autograd, reusing the primal's softmax weights, norms and activations.

Calling convention (methods/base.py)::

    out = net(x, cond, y)                        # x, out: (B, C, H, W)
    out, aux = net(x, cond, y, return_aux=True)  # nets built with aux_depth > 0
    out, d_out = net.jvp(x, cond, y, x_tangent, cond_tangents)  # forward-mode pass

Both heads output zero at initialisation (adaLN-Zero, or zero gates and a zero final
linear), so every method starts from the prediction 0.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.backbones.embed import ConditionEmbedder, ScalarEmbedder, sinusoidal
from benchmark.backbones.sizes import dit_sizes
from benchmark.backbones.tangent import (
    layer_norm_with_tangent,
    layer_with_tangent,
    modulation_tangent,
    scalar_embedder_with_tangent,
    sequential_with_tangent,
    softmax_tangent,
)

BACKBONE_VERSION = 1
"""Bump whenever the architecture math changes: it salts the result-cache keys."""

CONDITIONING_MODES = ("adaln", "in_context")
ATTENTION_KINDS = ("math", "sdpa")
DEFAULT_TOKENS_PER_SLOT = {"h": 4, "omega": 4, "t_min": 2, "t_max": 2}
"""Prefix tokens per slot in ``in_context`` mode (iMF); any other slot gets 4."""
DEFAULT_SLOT_TOKENS = 4
LABEL_KEY = "label"


# ----------------------------------------------------------------------------------------
# Embedding helpers


def sincos_pos_embed_2d(hidden: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D sin-cos positions, (grid_h * grid_w, hidden), row-major over the grid.
    The first half of the channels encodes the row, the second half the column (as DiT)."""
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    emb = torch.cat([_sincos_1d(hidden // 2, rows), _sincos_1d(hidden // 2, cols)], dim=-1)
    return emb.reshape(grid_h * grid_w, hidden).float()


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """pos (...) -> (..., dim) [sin, cos] features with frequencies 1 .. 1/10000."""
    omega = 1.0 / 10_000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = pos[..., None] * omega
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def scalar_features(
    s: Tensor, dim: int, dtype: torch.dtype, max_period: float = 10_000.0
) -> Tensor:
    """(B,) raw scalar -> (B, dim) [cos, sin] features in ``dtype`` (``embed.sinusoidal``)."""
    return sinusoidal(s.to(dtype), dim, max_period).to(dtype)


def embed_scalar(embedder: ScalarEmbedder, s: Tensor) -> Tensor:
    """``embedder(s)`` with the features in the embedder's parameter dtype: (B,) -> (B, D)."""
    dtype = embedder.mlp[0].weight.dtype
    return embedder.mlp(scalar_features(s, embedder.freq_dim, dtype))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, N, D) scaled and shifted per sample by (B, D) vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


def modulate_with_tangent(
    x: Tensor, dx: Tensor, shift: Tensor, d_shift: Tensor, scale: Tensor, d_scale: Tensor
) -> tuple[Tensor, Tensor]:
    """(modulate(x, shift, scale), its tangent); x, dx (B, N, D), the rest (B, D)."""
    out = modulate(x, shift, scale)
    with torch.no_grad():
        d_out = modulation_tangent(x, dx, 1 + scale[:, None], d_scale[:, None], d_shift[:, None])
    return out, d_out


def gated_residual_with_tangent(
    h: Tensor, dh: Tensor, gate: Tensor, d_gate: Tensor | None, branch: Tensor, d_branch: Tensor
) -> tuple[Tensor, Tensor]:
    """(h + gate * branch, its tangent); h, branch (B, N, D), gate broadcasts against them
    ((B, 1, D) from adaLN, or a (D,) parameter whose tangent ``d_gate`` is None)."""
    out = h + gate * branch
    with torch.no_grad():
        d_out = torch.addcmul(dh, gate, d_branch)
        if d_gate is not None:
            d_out.addcmul_(d_gate, branch)
    return out, d_out


# ----------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim; written out so forward AD never meets a
    fused kernel."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _normalize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., D) -> (x / rms(x) (..., D), 1 / rms(x) (..., 1))."""
        inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * inv_rms, inv_rms

    def forward(self, x: Tensor) -> Tensor:
        return self._normalize(x)[0] * self.weight

    def forward_with_tangent(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        """(forward(x), tangent); with n = x r, r = 1 / rms(x): dn = r (dx - n mean(n dx))."""
        normed, inv_rms = self._normalize(x)
        out = normed * self.weight
        with torch.no_grad():
            mean_ndx = (normed * dx).mean(-1, keepdim=True)
            d_out = torch.addcmul(dx, normed, mean_ndx, value=-1).mul_(inv_rms).mul_(self.weight)
        return out, d_out


class Attention(nn.Module):
    """Multi-head self-attention, (B, N, D) -> (B, N, D).

    ``kind="math"`` is softmax(q k^T / sqrt(d)) v written out, which supports
    ``torch.func.jvp``; ``kind="sdpa"`` uses ``F.scaled_dot_product_attention``, faster
    but its fused kernels have no forward AD, so only the hand-written
    ``forward_with_tangent`` differentiates it (it recomputes the softmax weights)."""

    def __init__(self, hidden: int, heads: int, kind: str = "math") -> None:
        super().__init__()
        self.heads = heads
        self.kind = kind
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def split_heads(self, qkv: Tensor) -> Tensor:
        """(B, N, 3 D) -> stacked q, k, v (3, B, heads, N, D / heads), contiguous: one
        copy here instead of one per batched matmul that reads q, k or v."""
        B, N, D3 = qkv.shape
        qkv = qkv.reshape(B, N, 3, self.heads, D3 // (3 * self.heads))
        return qkv.permute(2, 0, 3, 1, 4).contiguous()

    @staticmethod
    def merge_heads(out: Tensor) -> Tensor:
        """(B, heads, N, d) -> (B, N, heads * d)."""
        B, H, N, d = out.shape
        return out.transpose(1, 2).reshape(B, N, H * d)

    @staticmethod
    def softmax_weights(q: Tensor, k: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d)) over keys: (B, heads, N, N)."""
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.split_heads(self.qkv(x))
        if self.kind == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = self.softmax_weights(q, k) @ v
        return self.proj(self.merge_heads(out))

    def forward_with_tangent(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        """(forward(x), tangent), x and dx (B, N, D).  With S = q k^T / sqrt(d), P its
        softmax: dS = (dq k^T + q dk^T) / sqrt(d), dP = P (dS - sum(P dS)),
        d(P v) = dP v + P dv; the primal's P is reused ("sdpa" hides it: recomputed)."""
        q, k, v = self.split_heads(self.qkv(x))
        weights = None if self.kind == "sdpa" else self.softmax_weights(q, k)
        out = F.scaled_dot_product_attention(q, k, v) if weights is None else weights @ v
        out = self.proj(self.merge_heads(out))
        with torch.no_grad():
            dq, dk, dv = self.split_heads(F.linear(dx, self.qkv.weight))
            if weights is None:
                weights = self.softmax_weights(q, k)
            d_scores = dq @ k.transpose(-2, -1)
            d_scores = d_scores.add_(q @ dk.transpose(-2, -1)).mul_(1 / math.sqrt(q.shape[-1]))
            d_weights = softmax_tangent(weights, d_scores)
            d_out = (d_weights @ v).add_(weights @ dv)
            d_out = F.linear(self.merge_heads(d_out), self.proj.weight)
        return out, d_out


def mlp(hidden: int, mlp_ratio: float) -> nn.Sequential:
    """Token-wise MLP D -> mlp_ratio * D -> D with tanh-GELU (as DiT)."""
    inner = int(hidden * mlp_ratio)
    return nn.Sequential(
        nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)
    )


class AdaLNBlock(nn.Module):
    """DiT block with adaLN-Zero: h (B, N, D), c (B, D) -> (B, N, D).  Shift, scale and
    gate of both sub-layers come from c; the gates start at 0, so the block starts as
    the identity."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, attention: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, attention)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(hidden, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def zero_init(self) -> None:
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, h: Tensor, c: Tensor | None) -> Tensor:
        assert c is not None, "adaLN blocks need the condition vector c"
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = h + gate1[:, None] * self.attn(modulate(self.norm1(h), shift1, scale1))
        return h + gate2[:, None] * self.mlp(modulate(self.norm2(h), shift2, scale2))

    def forward_with_tangent(
        self, h: Tensor, dh: Tensor, c: Tensor | None, dc: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(forward(h, c), tangent) from the tangents dh (B, N, D) and dc (B, D)."""
        assert c is not None and dc is not None, "adaLN blocks need c and its tangent"
        mod, d_mod = sequential_with_tangent(self.adaLN_modulation, c, dc)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        d_shift1, d_scale1, d_gate1, d_shift2, d_scale2, d_gate2 = d_mod.chunk(6, dim=-1)
        x, dx = layer_norm_with_tangent(self.norm1, h, dh)
        x, dx = modulate_with_tangent(x, dx, shift1, d_shift1, scale1, d_scale1)
        x, dx = self.attn.forward_with_tangent(x, dx)
        h, dh = gated_residual_with_tangent(h, dh, gate1[:, None], d_gate1[:, None], x, dx)
        x, dx = layer_norm_with_tangent(self.norm2, h, dh)
        x, dx = modulate_with_tangent(x, dx, shift2, d_shift2, scale2, d_scale2)
        x, dx = sequential_with_tangent(self.mlp, x, dx)
        return gated_residual_with_tangent(h, dh, gate2[:, None], d_gate2[:, None], x, dx)


class GatedBlock(nn.Module):
    """Pre-norm block for in-context conditioning: h (B, N, D) -> (B, N, D).  RMSNorm,
    attention and MLP with zero-initialised per-channel residual gates (iMF); the
    condition lives in the prefix tokens, so ``c`` is ignored."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, attention: str) -> None:
        super().__init__()
        self.norm1 = RMSNorm(hidden)
        self.attn = Attention(hidden, heads, attention)
        self.norm2 = RMSNorm(hidden)
        self.mlp = mlp(hidden, mlp_ratio)
        self.gate_attn = nn.Parameter(torch.zeros(hidden))
        self.gate_mlp = nn.Parameter(torch.zeros(hidden))

    def zero_init(self) -> None:
        nn.init.zeros_(self.gate_attn)
        nn.init.zeros_(self.gate_mlp)

    def forward(self, h: Tensor, c: Tensor | None = None) -> Tensor:
        h = h + self.gate_attn * self.attn(self.norm1(h))
        return h + self.gate_mlp * self.mlp(self.norm2(h))

    def forward_with_tangent(
        self, h: Tensor, dh: Tensor, c: Tensor | None = None, dc: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(forward(h), tangent) from the tangent dh (B, N, D); c and dc are ignored."""
        x, dx = self.norm1.forward_with_tangent(h, dh)
        x, dx = self.attn.forward_with_tangent(x, dx)
        h, dh = gated_residual_with_tangent(h, dh, self.gate_attn, None, x, dx)
        x, dx = self.norm2.forward_with_tangent(h, dh)
        x, dx = sequential_with_tangent(self.mlp, x, dx)
        return gated_residual_with_tangent(h, dh, self.gate_mlp, None, x, dx)


class AdaLNFinalLayer(nn.Module):
    """DiT final layer: h (B, N, D), c (B, D) -> (B, N, p*p*C); adaLN and linear zero-init."""

    def __init__(self, hidden: int, patch_out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def zero_init(self) -> None:
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: Tensor, c: Tensor | None) -> Tensor:
        assert c is not None, "adaLN final layer needs the condition vector c"
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(h), shift, scale))

    def forward_with_tangent(
        self, h: Tensor, dh: Tensor, c: Tensor | None, dc: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(forward(h, c), tangent) from the tangents dh (B, N, D) and dc (B, D)."""
        assert c is not None and dc is not None, "adaLN final layer needs c and its tangent"
        mod, d_mod = sequential_with_tangent(self.adaLN_modulation, c, dc)
        (shift, scale), (d_shift, d_scale) = mod.chunk(2, dim=-1), d_mod.chunk(2, dim=-1)
        x, dx = layer_norm_with_tangent(self.norm, h, dh)
        x, dx = modulate_with_tangent(x, dx, shift, d_shift, scale, d_scale)
        return layer_with_tangent(self.linear, x, dx)


class FinalLayer(nn.Module):
    """In-context final layer: RMSNorm then a zero-init linear, (B, N, D) -> (B, N, p*p*C)."""

    def __init__(self, hidden: int, patch_out: int) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden)
        self.linear = nn.Linear(hidden, patch_out)

    def zero_init(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: Tensor, c: Tensor | None = None) -> Tensor:
        return self.linear(self.norm(h))

    def forward_with_tangent(
        self, h: Tensor, dh: Tensor, c: Tensor | None = None, dc: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(forward(h), tangent) from the tangent dh (B, N, D); c and dc are ignored."""
        return layer_with_tangent(self.linear, *self.norm.forward_with_tangent(h, dh))


class PrefixTokens(nn.Module):
    """In-context conditioning tokens: for each key (a slot or ``"label"``), ``n`` learned
    tokens plus that key's embedding.  Embeddings {key: (B, D)} -> tokens (B, P, D)."""

    def __init__(self, counts: dict[str, int], hidden: int) -> None:
        super().__init__()
        self.tokens = nn.ParameterDict(
            {key: nn.Parameter(0.02 * torch.randn(n, hidden)) for key, n in counts.items()}
        )

    @property
    def num_tokens(self) -> int:
        return sum(t.shape[0] for t in self.tokens.values())

    def forward(self, embeddings: dict[str, Tensor]) -> Tensor:
        parts = [tok[None] + embeddings[key][:, None] for key, tok in self.tokens.items()]
        return torch.cat(parts, dim=1)

    def forward_with_tangent(
        self, embeddings: dict[str, Tensor], d_embeddings: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """(forward(embeddings), tangent (B, P, D)); a key missing from ``d_embeddings``
        (the label, a slot without tangent) has tangent 0, as the learned tokens."""
        tokens = self(embeddings)
        with torch.no_grad():
            B, D = tokens.shape[0], tokens.shape[-1]
            parts = [
                d_embeddings[key][:, None].expand(B, tok.shape[0], D)
                if key in d_embeddings
                else tokens.new_zeros(B, tok.shape[0], D)
                for key, tok in self.tokens.items()
            ]
            return tokens, torch.cat(parts, dim=1)


# ----------------------------------------------------------------------------------------
# The model


class DiT(nn.Module):
    """DiT for images x (B, C, H, W) -> (B, C, H, W) conditioned on raw scalars and a label.

    Args (keyword-only):
        in_channels, image_size: C and H = W (or an (H, W) pair), divisible by ``patch_size``.
        hidden, depth, heads, mlp_ratio: transformer width, number of blocks, heads, MLP ratio.
        num_classes: K; labels are 0..K, K being the null (CFG) label.
        slots: the scalar conditions ``cond`` must hold, e.g. ``("t", "r")``.
        conditioning_mode: ``"adaln"`` (DiT adaLN-Zero on c = sum of slot and label
            embeddings) or ``"in_context"`` (iMF prefix tokens, gated pre-norm blocks).
        aux_depth: if > 0, the last ``aux_depth`` blocks and the final layer are duplicated
            into an auxiliary head (iMF v-head) sharing the first ``depth - aux_depth``.
        tokens_per_slot: in-context prefix tokens per slot, merged over
            ``DEFAULT_TOKENS_PER_SLOT`` (other slots: 4).
        label_tokens: in-context class tokens.
        label_init_std: std of the class-embedding table at initialisation (DiT: 0.02; the
            suite's default 1.0, see ``ModelConfig.label_init_std``).
        attention: ``"math"`` (explicit softmax, JVP-safe) or ``"sdpa"`` (no forward AD).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int | tuple[int, int],
        patch_size: int,
        hidden: int,
        depth: int,
        heads: int,
        num_classes: int,
        slots: tuple[str, ...],
        conditioning_mode: str = "adaln",
        mlp_ratio: float = 4.0,
        aux_depth: int = 0,
        tokens_per_slot: dict[str, int] | None = None,
        label_tokens: int = 8,
        label_init_std: float = 0.02,
        attention: str = "math",
    ) -> None:
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        _check_config(
            size, patch_size, hidden, depth, heads, conditioning_mode, aux_depth, attention
        )
        self.in_channels, self.image_size, self.patch_size = in_channels, size, patch_size
        self.grid = (size[0] // patch_size, size[1] // patch_size)
        self.conditioning_mode, self.aux_depth = conditioning_mode, aux_depth
        self.adaln = conditioning_mode == "adaln"
        self.label_init_std = label_init_std

        self.cond_embed = ConditionEmbedder(tuple(slots), num_classes, hidden)
        self.patch_embed = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, *self.grid), persistent=False)
        counts = None if self.adaln else _prefix_counts(self.slots, tokens_per_slot, label_tokens)
        self.prefix = PrefixTokens(counts, hidden) if counts else None
        self.num_prefix = 0 if self.prefix is None else self.prefix.num_tokens

        def blocks(n: int) -> nn.ModuleList:
            block = AdaLNBlock if self.adaln else GatedBlock
            return nn.ModuleList(block(hidden, heads, mlp_ratio, attention) for _ in range(n))

        final = AdaLNFinalLayer if self.adaln else FinalLayer
        patch_out = patch_size * patch_size * in_channels
        self.blocks = blocks(depth - aux_depth)  # shared trunk
        self.tail = blocks(aux_depth)  # main head's own last blocks
        self.final_layer = final(hidden, patch_out)
        self.aux_tail = blocks(aux_depth)  # empty without an aux head
        self.aux_final_layer = final(hidden, patch_out) if aux_depth else None
        self.initialize_weights()

    @property
    def slots(self) -> tuple[str, ...]:
        return self.cond_embed.slots

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, small embeddings (the class table at
        ``label_init_std``), zero-init outputs."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for embedder in self.cond_embed.scalars.values():
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.cond_embed.labels.table.weight, std=self.label_init_std)
        for block in [*self.blocks, *self.tail, *self.aux_tail]:
            block.zero_init()
        for final in (self.final_layer, self.aux_final_layer):
            if final is not None:
                final.zero_init()

    # -- pieces of the forward pass --------------------------------------------------------
    def embed_conditions(self, cond: dict[str, Tensor], y: Tensor) -> dict[str, Tensor]:
        """{slot: (B, D)} raw-scalar embeddings plus {"label": (B, D)}."""
        self.cond_embed.check(cond)
        out = {s: embed_scalar(self.cond_embed.scalars[s], cond[s]) for s in self.slots}
        out[LABEL_KEY] = self.cond_embed.labels(y)
        return out

    def embed_conditions_with_tangent(
        self, cond: dict[str, Tensor], y: Tensor, cond_tangents: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(embed_conditions(cond, y), {slot: (B, D) tangent} for the slots in
        ``cond_tangents``); the label and the other slots have tangent 0."""
        self.cond_embed.check(cond)
        out, d_out = {}, {}
        for s in self.slots:
            embedder = self.cond_embed.scalars[s]
            features = scalar_features(cond[s], embedder.freq_dim, embedder.mlp[0].weight.dtype)
            out[s], d = scalar_embedder_with_tangent(embedder, features, cond_tangents.get(s))
            if d is not None:
                d_out[s] = d
        out[LABEL_KEY] = self.cond_embed.labels(y)
        return out, d_out

    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> patch tokens with positions (B, N, D), N = H W / p^2."""
        expected = (self.in_channels, *self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"DiT built for inputs (B, {expected}), got x of shape {tuple(x.shape)}"
            )
        # contiguous: the add would keep the conv's (B, D, N) layout for the whole residual
        # stream, and every norm and linear would copy it
        return (self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed).contiguous()

    def patchify_with_tangent(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        """(patchify(x), tangent (B, N, D)): the patch embedding is affine in x and the
        positions are constant."""
        h = self.patchify(x)
        with torch.no_grad():
            dh = F.conv2d(dx, self.patch_embed.weight, stride=self.patch_size)
            return h, dh.flatten(2).transpose(1, 2).contiguous()

    def unpatchify(self, h: Tensor) -> Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); channels ordered (p_row, p_col, C) as DiT."""
        p, (gh, gw), C = self.patch_size, self.grid, self.in_channels
        h = h.reshape(h.shape[0], gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(h.shape[0], C, gh * p, gw * p)

    def _head(self, h: Tensor, c: Tensor | None, tail: nn.ModuleList, final: nn.Module) -> Tensor:
        """Trunk features (B, P + N, D) through one head's blocks -> image (B, C, H, W)."""
        for block in tail:
            h = block(h, c)
        return self.unpatchify(final(h[:, self.num_prefix :], c))

    def _head_with_tangent(
        self,
        h: Tensor,
        dh: Tensor,
        c: Tensor | None,
        dc: Tensor | None,
        tail: nn.ModuleList,
        final: nn.Module,
    ) -> tuple[Tensor, Tensor]:
        """``_head`` with the tangent dh (B, P + N, D) -> (image, tangent), (B, C, H, W)."""
        for block in tail:
            h, dh = block.forward_with_tangent(h, dh, c, dc)
        n = self.num_prefix  # prefix tokens are dropped before the final layer
        out, d_out = final.forward_with_tangent(h[:, n:], dh[:, n:], c, dc)
        with torch.no_grad():
            d_out = self.unpatchify(d_out)
        return self.unpatchify(out), d_out

    def _check_return_aux(self, return_aux: bool) -> None:
        if return_aux and not self.aux_depth:
            raise ValueError(
                "return_aux=True needs a DiT built with aux_depth > 0 (got aux_depth=0)"
            )

    def forward(
        self, x: Tensor, cond: dict[str, Tensor], y: Tensor, return_aux: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, C, H, W); cond {slot: (B,) raw float}; y (B,) long -> (B, C, H, W),
        or (main, aux) both (B, C, H, W) with ``return_aux=True``."""
        self._check_return_aux(return_aux)
        embeddings = self.embed_conditions(cond, y)
        h = self.patchify(x)
        if self.prefix is None:
            c = sum(embeddings.values())
        else:
            c = None
            h = torch.cat([self.prefix(embeddings), h], dim=1)
        for block in self.blocks:
            h = block(h, c)
        out = self._head(h, c, self.tail, self.final_layer)
        if not return_aux:
            return out
        # the aux head runs only on request: no cost for nets that never ask for it
        return out, self._head(h, c, self.aux_tail, self.aux_final_layer)

    def jvp(
        self,
        x: Tensor,
        cond: dict[str, Tensor],
        y: Tensor,
        x_tangent: Tensor,
        cond_tangents: dict[str, Tensor],
        return_aux: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Forward-mode pass: (out, d_out), or ((out, aux), (d_out, d_aux)) with
        ``return_aux``, all (B, C, H, W).

        ``out`` is ``forward(x, cond, y)`` by the same ops, recorded by autograd when grad
        is enabled; ``d_out = d/de forward(x + e x_tangent, cond + e cond_tangents, y)``
        at e = 0, computed without autograd (no grad_fn).  x_tangent (B, C, H, W);
        cond_tangents {slot: (B,)}, a slot left out has tangent 0.
        """
        self._check_return_aux(return_aux)
        unknown = sorted(set(cond_tangents) - set(self.slots))
        if unknown:
            raise ValueError(f"tangent given for slot(s) {unknown}; the DiT has slots {self.slots}")
        embeddings, d_embeddings = self.embed_conditions_with_tangent(cond, y, cond_tangents)
        h, dh = self.patchify_with_tangent(x, x_tangent)
        if self.prefix is None:
            c = sum(embeddings.values())
            with torch.no_grad():
                dc = sum(d_embeddings.values()) if d_embeddings else torch.zeros_like(c)
        else:
            c = dc = None
            prefix, d_prefix = self.prefix.forward_with_tangent(embeddings, d_embeddings)
            h = torch.cat([prefix, h], dim=1)
            with torch.no_grad():
                dh = torch.cat([d_prefix, dh], dim=1)
        for block in self.blocks:
            h, dh = block.forward_with_tangent(h, dh, c, dc)
        out = self._head_with_tangent(h, dh, c, dc, self.tail, self.final_layer)
        if not return_aux:
            return out
        aux = self._head_with_tangent(h, dh, c, dc, self.aux_tail, self.aux_final_layer)
        return (out[0], aux[0]), (out[1], aux[1])


def _check_config(
    size: tuple[int, ...],
    patch_size: int,
    hidden: int,
    depth: int,
    heads: int,
    conditioning_mode: str,
    aux_depth: int,
    attention: str,
) -> None:
    """Raise ValueError naming the bad DiT option."""
    if len(size) != 2 or any(s % patch_size for s in size):
        raise ValueError(f"image_size {size} must be (H, W) divisible by patch_size={patch_size}")
    if hidden % heads or hidden % 4:
        raise ValueError(f"hidden={hidden} must be divisible by heads={heads} and by 4")
    if conditioning_mode not in CONDITIONING_MODES:
        raise ValueError(
            f"unknown conditioning_mode '{conditioning_mode}'; expected one of {CONDITIONING_MODES}"
        )
    if not 0 <= aux_depth < depth:
        raise ValueError(f"aux_depth={aux_depth} must be in [0, depth={depth})")
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention '{attention}'; expected one of {ATTENTION_KINDS}")


def _prefix_counts(
    slots: tuple[str, ...], tokens_per_slot: dict[str, int] | None, label_tokens: int
) -> dict[str, int]:
    """Prefix-token count per slot and for the label, in token order."""
    given = dict(tokens_per_slot or {})
    stray = sorted(set(given) - set(slots))
    if stray:
        raise ValueError(f"tokens_per_slot names slots {stray} that are not in slots={slots}")
    counts = {s: given.get(s, DEFAULT_TOKENS_PER_SLOT.get(s, DEFAULT_SLOT_TOKENS)) for s in slots}
    counts[LABEL_KEY] = label_tokens
    bad = {k: n for k, n in counts.items() if n < 1}
    if bad:
        raise ValueError(f"every prefix-token count must be >= 1, got {bad}")
    return counts


# ----------------------------------------------------------------------------------------
# Size registry

DIT_SIZES: dict[str, dict[str, Any]] = dit_sizes()
"""Model-size axis, from the registry in ``benchmark.backbones.sizes``.  Parameter counts (adaLN, 32x32x4 latents, 1000 classes, one slot)
match DiT's Table 1 up to its learned-sigma output channels; ``in_context`` drops the
adaLN linears (dit-b: 88M, close to iMF's B/2 89M)."""


def build_dit(
    size: str,
    *,
    in_channels: int,
    image_size: int | tuple[int, int],
    num_classes: int,
    slots: tuple[str, ...],
    **overrides: Any,
) -> DiT:
    """A DiT of a registered ``size``; ``overrides`` replace any other constructor
    option (``conditioning_mode``, ``aux_depth``, ``patch_size``, ...)."""
    sizes = dit_sizes()
    if size not in sizes:
        raise ValueError(f"unknown model size '{size}'; expected one of {tuple(sizes)}")
    fixed = {"self", "in_channels", "image_size", "num_classes", "slots"}
    allowed = set(inspect.signature(DiT.__init__).parameters) - fixed
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown DiT option(s) {unknown}; expected some of {sorted(allowed)}")
    options = {**sizes[size], **overrides}
    return DiT(
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        slots=slots,
        **options,
    )
