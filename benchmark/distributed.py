"""Data-parallel training across processes, with no DDP wrapper.

The JVP methods (MeanFlow, iMF, sCM) call ``torch.func.jvp`` on the bare backbone, which
does not accept a DDP wrapper, and calling ``model.module`` instead silently skips DDP's
gradient all-reduce (docs/methods.md §6.2).  So the training loop all-reduces gradients itself
after ``backward()``, as py-meanflow does: every rank ends each step with the same
gradient, hence the same weights, optimizer state and EMA.

The process group comes from the environment: torchrun (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) or a submitit job with several tasks
(``TorchDistributedEnvironment().export()``).  Without either, everything here is a no-op
for one process.  Small collectives (flags, losses, checksums) travel as CPU tensors
over gloo; gradients on the GPU over NCCL (the group is ``cpu:gloo,cuda:nccl``).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 1 << 24
"""Gradient elements flattened into one all-reduce (64 MiB of fp32): few calls, bounded copy."""


class ReplicasDiverged(RuntimeError):
    """The ranks' copies of the weights differ: gradients were not all-reduced."""


# ----------------------------------------------------------------------------------------
# The process group


def init_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank), joining the process group the environment describes
    (once per process; later calls return the same triple).  One process: (0, 1, 0)."""
    global _joined_rank
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), _local_rank()
    _export_submitit_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return 0, 1, 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device_index())  # NCCL binds each rank to its own GPU
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    _joined_rank = dist.get_rank()
    return _joined_rank, dist.get_world_size(), _local_rank()


_joined_rank = 0
"""This process's rank in the group it joined (kept after ``shutdown``)."""


def _export_submitit_env() -> None:
    """Inside a submitit job with several tasks, set the variables torchrun would set.
    Only in such a job: a driver run inside a multi-task allocation stays one process."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        # keep every GPU visible: local_device_index picks the task's own one
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device_index() -> int:
    """This rank's GPU: LOCAL_RANK, or 0 when the scheduler shows each task only its own."""
    return _local_rank() % max(1, torch.cuda.device_count())


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files, prints progress and
    evaluates; still true or false after ``shutdown``."""
    return _joined_rank == 0


def shutdown() -> None:
    """Leave the process group (no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# Collectives (every rank must call them in the same order)


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum every parameter's ``.grad`` over the ranks, in place.

    The caller scales each micro-batch loss by 1 / (total micro-batches), so the sum is the
    global mean gradient.  A parameter with no gradient on any rank keeps ``grad=None``
    (AdamW then skips it, as in one process); one with a gradient on some ranks only gets
    zeros on the others first.  Grads are flattened into buckets per (device, dtype).
    """
    if world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    grads: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p, present in zip(params, has.tolist()):
        if present:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads[(p.grad.device, p.grad.dtype)].append(p.grad)
    for group in grads.values():
        for bucket in _buckets(group):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            summed = flat.split([g.numel() for g in bucket])
            torch._foreach_copy_(bucket, [s.view_as(g) for s, g in zip(summed, bucket)])


def _buckets(tensors: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + t.numel() > BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def all_reduce_mean(value: float) -> float:
    """The mean of ``value`` over the ranks (float64, so two ranks' mean of a and b is
    bit-equal to one process's (a + b) / 2)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world_size()


def from_main(value: int) -> int:
    """Rank 0's ``value`` on every rank (e.g. whether a file rank 0 sees exists)."""
    if world_size() == 1:
        return value
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier() -> None:
    """Wait for every rank (a CPU collective: no GPU is needed or guessed)."""
    from_main(0)


def check_same(value: int | str, what: str) -> None:
    """Raise on every rank if ``value`` differs between ranks; ``what`` names it."""
    if isinstance(value, str):
        value = int.from_bytes(hashlib.sha256(value.encode()).digest()[:7], "little")
    if not _agree(value):
        raise RuntimeError(f"the {world_size()} processes disagree on {what} (rank {rank()} has "
                           f"{value}); expected every process to run the same command on the "
                           f"same files (a results_dir shared by all nodes)")


def check_replicas(params: Iterable[torch.Tensor], step: int) -> None:
    """Raise ``ReplicasDiverged`` on every rank unless all ranks hold bit-identical
    ``params``, compared through a float64 checksum that weights each tensor by position
    (its bit pattern, so NaN weights compare too)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        total = sum(((i + 1) * p.detach().double().sum()).item() for i, p in enumerate(params))
    if not _agree(struct.unpack("<q", struct.pack("<d", total))[0]):
        raise ReplicasDiverged(f"the weights differ across the {world_size()} processes at step "
                               f"{step}: gradients were not all-reduced (a DDP wrapper bypassed by "
                               f"a JVP, or a code path that skips benchmark.distributed.all_reduce_grads)")


def _agree(value: int) -> bool:
    """Whether every rank holds the same int64 ``value`` (max and min of it coincide)."""
    if world_size() == 1:
        return True
    t = torch.tensor([value, ~value], dtype=torch.int64)  # ~v = -v - 1 cannot overflow
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item() == ~t[1].item()
