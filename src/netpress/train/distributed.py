"""Distributed (DDP) support for the shared fine-tuning loop.

The loop runs unchanged in one process or under ``torchrun --nproc_per_node=N``: when launched by
torchrun (``TORCHELASTIC_RUN_ID``, even with N = 1), when the environment names a world larger than
one (``WORLD_SIZE`` > 1) or when a process group is already initialised, :func:`setup` joins the
group (gloo on CPU, nccl on GPU), and the loop wraps the model in ``DistributedDataParallel`` and
gives each rank its slice of every batch (rank ``r`` of ``N`` takes the contiguous chunk ``r`` of the
batch's examples, its mean loss weighted by its share: :func:`rank_slice`), so the averaged
gradient equals the one-process gradient of the whole batch, whatever the batch size (up to float
rounding; BatchNorm statistics are per rank).

A missing or unreachable rendezvous is a :class:`RecipeError` after ``timeout_s`` seconds, never a hang.

Devices: :func:`resolve_device` turns ``TrainConfig.device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``)
into a ``torch.device``; under torchrun ``cuda`` / ``auto`` mean ``cuda:LOCAL_RANK`` (one GPU per
process), and a CUDA device makes :func:`setup` pick nccl (after ``torch.cuda.set_device``).

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


def in_group() -> bool:
    """Whether a process group is initialised (the loop then trains through DDP, even with one rank)."""
    return dist.is_available() and dist.is_initialized()


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


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``, set by torchrun; 0 otherwise)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise RecipeError("LOCAL_RANK", got=os.environ.get("LOCAL_RANK"), expected="an integer",
                          fix="launch with torchrun --nproc_per_node=N (it sets LOCAL_RANK)") from None


def resolve_device(spec: str = "cpu") -> torch.device:
    """The device a ``TrainConfig.device`` names.

    ``cpu``; ``cuda`` (``cuda:LOCAL_RANK`` under torchrun, else ``cuda:0``); ``cuda:N``; ``auto``
    (``cuda`` when CUDA is available, else ``cpu``).

    Raises:
        RecipeError: CUDA asked for where torch has none, a GPU index out of range, or more
            torchrun processes on this node than GPUs.

    Example:
        >>> from netpress.train.distributed import resolve_device
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if spec == "cpu":
        return torch.device("cpu")
    has = torch.cuda.is_available()
    if spec == "auto" and not has:
        return torch.device("cpu")
    if not spec.startswith("cuda") and spec != "auto":
        raise RecipeError("finetune.device", got=spec, expected="cpu, cuda, cuda:N or auto",
                          fix="use e.g. device: cuda")
    if not has:
        raise RecipeError("finetune.device", got=spec,
                          expected=f"a CUDA GPU, but torch.cuda.is_available() is False here "
                                   f"(torch {torch.__version__}, CUDA build {torch.version.cuda})",
                          fix="use device: cpu (or auto: the GPU when there is one), or run on a "
                              "machine with an NVIDIA GPU and a CUDA build of torch")
    count = torch.cuda.device_count()
    if spec in ("cuda", "auto"):
        index = local_rank()
        if index >= count:
            raise RecipeError("finetune.device", got=f"{spec} on LOCAL_RANK {index}",
                              expected=f"one GPU per process, and this node has {count}",
                              fix=f"launch with torchrun --nproc_per_node={count} or fewer")
    else:
        index = int(spec.split(":", 1)[1])
        if index >= count:
            raise RecipeError("finetune.device", got=spec,
                              expected=f"a GPU index below {count} (the GPUs torch sees)",
                              fix="use device: cuda, or check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def setup(timeout_s: float = 60.0, backend: str | None = None,
          device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT``).

    Args:
        timeout_s: how long to wait for the other ranks before failing.
        backend: ``gloo`` / ``nccl``; default nccl when ``device`` is a CUDA device, else gloo
            (without ``device``: nccl when CUDA is available).
        device: the device this rank trains on; a CUDA device becomes the current one.

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
    if size <= 1 and not os.environ.get("TORCHELASTIC_RUN_ID"):
        return 0, 1  # not launched by torchrun; under torchrun even one process joins a group
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
        if device is not None:
            cuda = device.type == "cuda"
        else:
            cuda = torch.cuda.is_available()
        backend = backend or ("nccl" if cuda else "gloo")
        if backend == "nccl" and device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
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


def rank_slice(batch: Batch, rank: int, size: int) -> tuple[Batch, float]:
    """This rank's part of ``batch`` and the weight of its mean loss.

    A loss is a mean over the examples it sees and DDP averages gradients over ranks, so rank
    ``r`` multiplies its loss by ``n_r · N / n``: the averaged gradient is then the one-process
    gradient of the whole batch even when ``n`` is not a multiple of ``N``. A batch with fewer
    examples than ranks is not cut (a rank would get none, and the mean of nothing is NaN): every
    rank runs all of it with weight 1.

    Example:
        >>> b = Batch((torch.zeros(5, 2),))
        >>> [(p.size, w) for p, w in (rank_slice(b, r, 2) for r in range(2))]
        [(2, 0.8), (3, 1.2)]
        >>> rank_slice(Batch((torch.zeros(1, 2),)), 1, 2)[0].size
        1
    """
    if size == 1 or batch.size < size:
        return batch, 1.0
    part = shard(batch, rank, size)
    return part, part.size * size / batch.size


def mean_across(value: float) -> float:
    """Average a Python float over ranks (identity in one process)."""
    rank, size = world()
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item()) / size


def _comm_device() -> torch.device:
    """Where collective buffers live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_grads(params: list[torch.Tensor]) -> None:
    """All-reduce (mean) the gradients of tensors DDP does not own (e.g. distillation adapters)."""
    size = world()[1]
    for p in params:
        if p.grad is not None and size > 1:
            dist.all_reduce(p.grad)
            p.grad.div_(size)


def barrier() -> None:
    if world()[1] > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


__all__ = ["average_grads", "barrier", "in_group", "local_rank", "mean_across", "rank_slice",
           "resolve_device", "setup", "shard", "teardown", "world"]
