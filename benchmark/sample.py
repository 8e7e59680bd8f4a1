"""The sampling harness: per-sample seeded noise and counted NFE.

Every sample's noise comes from its own generator seeded from (seed, sample index,
stream), so a sample never depends on the batch size or on which worker drew it.  A
wrapper around the backbone counts forward passes per sample (rows processed divided by
the batch size), so NFE is measured, CFG's extra pass and any method overhead included.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.progress import progress_bar
from methods.base import Method


def sample_seed(seed: int, index: int, stream: int) -> int:
    digest = hashlib.sha256(f"sample/{seed}/{index}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def per_sample_noise(seed: int, indices: range | list[int], shape: tuple[int, ...],
                     stream: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """Standard normal noise (len(indices), *shape); row i depends only on (seed, indices[i], stream)."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, i, stream)))
            for i in indices]
    return torch.stack(rows).to(device)


class CountingNet(nn.Module):
    """Forwards to ``net`` and counts the rows it processes.  Deliberately exposes no
    ``jvp``: sampling is plain forward passes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.rows = 0

    def forward(self, x: Tensor, cond: dict[str, Tensor], y: Tensor, return_aux: bool = False):
        self.rows += x.shape[0]
        return self.net(x, cond, y, return_aux=True) if return_aux else self.net(x, cond, y)


@dataclass
class Generated:
    samples: Tensor      # (N, *shape) on the CPU
    labels: Tensor       # (N,)
    nfe_counted: float   # backbone passes per sample, measured
    seconds: float       # wall time of sampling alone


def balanced_labels(n: int, num_classes: int) -> Tensor:
    """0, 1, ..., K-1, 0, 1, ...; the null label 0 for unconditional data."""
    return torch.arange(n) % num_classes if num_classes else torch.zeros(n, dtype=torch.long)


@torch.no_grad()
def generate(method: Method, net: nn.Module, *, shape: tuple[int, ...], labels: Tensor,
             nfe: int, guidance: float, seed: int, batch_size: int,
             eval_params: dict[str, Any] | None = None, device: torch.device | str = "cpu",
             first_index: int = 0, progress: bool = False) -> Generated:
    """Draw ``len(labels)`` samples; sample i uses noise seeded by (seed, first_index + i).
    ``progress``: a bar over the samples (on a terminal only, ``benchmark.progress``)."""
    counter = CountingNet(net).eval()
    outputs, n, start = [], labels.shape[0], time.perf_counter()
    bar = progress_bar(n, f"sample nfe={nfe}", progress, unit="sample")
    for lo in range(0, n, batch_size):
        idx = range(first_index + lo, first_index + min(n, lo + batch_size))
        noise = per_sample_noise(seed, idx, shape, 0, device)

        def fresh_noise(i: int, idx=idx) -> Tensor:
            return per_sample_noise(seed, idx, shape, i + 1, device)

        x = method.sample(counter, noise, labels[lo:lo + len(idx)].to(device), nfe=nfe,
                          guidance=guidance, fresh_noise=fresh_noise, **(eval_params or {}))
        outputs.append(x.float().cpu())
        bar.update(len(idx))
    bar.close()
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return Generated(torch.cat(outputs), labels, counter.rows / n, seconds)
