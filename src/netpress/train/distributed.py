"""Distributed (DDP) support for the shared fine-tuning loop.

The loop runs unchanged in one process or under ``torchrun --nproc_per_node=N``: when the
environment names a world larger than one (``WORLD_SIZE`` > 1, as torchrun sets it) or a process
group is already initialised, :func:`setup` joins the group (gloo on CPU, nccl on GPU), and the loop
wraps the model in ``DistributedDataParallel`` and gives each rank its slice of every batch
(rank ``r`` of ``N`` takes the contiguous chunk ``r`` of the batch's examples), so the averaged
gradient equals the one-process gradient of the whole batch (up to float rounding; BatchNorm
statistics are per rank).

A missing or unreachable rendezvous is a :class:`RecipeError` after ``timeout_s`` seconds, never a hang.

Example:
    >>> from netpress.train.distributed import world
    >>> world()   # not launched by torchrun: one process
    (0, 1)
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from netpress.core.data import Batch
from netpress.core.errors import RecipeError

_OWNED = False  # whether this module created the process group (and so destroys it)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise RecipeError("WORLD_SIZE", got=os.environ.get("WORLD_SIZE"), expected="an integer",
                          fix="launch with torchrun --nproc_per_node=N") from None


def setup(timeout_s: float = 60.0, backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT``).

    Args:
        timeout_s: how long to wait for the other ranks before failing.
        backend: ``gloo`` / ``nccl``; default nccl when CUDA is available, else gloo.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` when not launched distributed.

    Raises:
        RecipeError: ``WORLD_SIZE`` > 1 but the rendezvous variables are missing, or the other
            ranks did not join within ``timeout_s``.
    """
    global _OWNED
    if dist.is_available() and dist.is_initialized():
        return world()
    size = _env_world()
    if size <= 1:
        return 0, 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise RecipeError("distributed launch", got=f"WORLD_SIZE={size} without {', '.join(missing)}",
                          expected="a rendezvous: RANK, MASTER_ADDR and MASTER_PORT",
                          fix="launch with `torchrun --nproc_per_node=N ...` (it sets them), or "
                              "unset WORLD_SIZE for a one-process run")
    rank = int(os.environ["RANK"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=timeout,
                              wait_for_workers=True)
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    except (RuntimeError, OSError, dist.DistStoreError) as exc:
        raise RecipeError("distributed rendezvous", got=f"{host}:{port}, rank {rank} of {size}",
                          expected=f"all {size} ranks to join within {timeout_s:g} s ({exc})",
                          fix="start every rank (torchrun --nproc_per_node=N) with the same "
                              "MASTER_ADDR/MASTER_PORT, or run in one process") from None
    _OWNED = True
    return rank, size


def teardown() -> None:
    """Destroy the process group if :func:`setup` created it."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def shard(batch: Batch, rank: int, size: int) -> Batch:
    """Contiguous chunk ``rank`` of ``size`` of a batch (examples ``[r·n/N, (r+1)·n/N)``)."""
    if size == 1:
        return batch
    n = batch.size
    lo, hi = rank * n // size, (rank + 1) * n // size

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[lo:hi]

    inputs = ({k: cut(v) for k, v in batch.inputs.items()} if isinstance(batch.inputs, dict)
              else tuple(cut(v) for v in batch.inputs))
    return Batch(inputs, None if batch.target is None else cut(batch.target))


def mean_across(value: float) -> float:
    """Average a Python float over ranks (identity in one process)."""
    rank, size = world()
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / size


def average_grads(params: list[torch.Tensor]) -> None:
    """All-reduce (mean) the gradients of tensors DDP does not own (e.g. distillation adapters)."""
    size = world()[1]
    for p in params:
        if p.grad is not None and size > 1:
            dist.all_reduce(p.grad)
            p.grad.div_(size)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


__all__ = ["average_grads", "barrier", "mean_across", "setup", "shard", "teardown", "world"]
