"""Data-parallel extraction on torch.distributed (``torchrun --nproc_per_node N`` or ``accelerate launch``).

Each rank takes a contiguous block of the batches a single process would run — the same batches, so every
row's activations are computed exactly as they would be alone — and the blocks are put back together in
order: in memory with one all-gather, or on disk as per-rank caches that rank 0 links into one index. The
result is the single-process result, bit for bit and row for row (on the same thread count: a CPU's
matrix kernels may sum in another order on another number of threads).

Launchers set ``RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT``; when they are set and no process
group exists yet, one is created (``gloo`` on CPU, ``nccl`` when the model is on CUDA), so a script or the
``intervene`` command runs unchanged under the launcher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``world`` processes (``Ranks(0, 1)`` when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def block(self, n_batches: int) -> range:
        """The contiguous batch indices this rank runs: ``n_batches`` split into ``world`` near-equal blocks."""
        lo = self.rank * n_batches // self.world
        hi = (self.rank + 1) * n_batches // self.world
        return range(lo, hi)


def ranks(device: torch.device | str | None = None) -> Ranks:
    """The current process's place in the job, creating the process group if a launcher asked for one."""
    import torch.distributed as dist

    if not dist.is_available():
        return Ranks()
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1 or "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
            return Ranks()
        cuda = device is not None and torch.device(device).type == "cuda"
        dist.init_process_group(backend="nccl" if cuda and dist.is_nccl_available() else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def barrier(r: Ranks) -> None:
    """Wait for every rank (a no-op alone)."""
    if r.distributed:
        import torch.distributed as dist

        dist.barrier()


def gather_objects(r: Ranks, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` alone). For our own tensors between
    our own processes: nothing read from a file is ever unpickled here."""
    if not r.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * r.world
    dist.all_gather_object(out, obj)
    return out


def is_main_process() -> bool:
    """True on rank 0, or when not distributed: the one process that writes a command's result files."""
    return ranks().main
