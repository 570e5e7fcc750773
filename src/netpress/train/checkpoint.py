"""Training checkpoints: model, optimiser, scheduler, step and RNG state, written atomically.

A checkpoint is one file ``<dir>/checkpoint.pt`` written by rank 0 (temporary file + ``fsync`` +
``os.replace``), so a run killed at any moment leaves either the previous checkpoint or the new
one, never a torn file. It holds only tensors and plain values and is read back with
``torch.load(weights_only=True)`` (no arbitrary unpickling).

Checkpoints are device-free: every tensor is copied to the CPU when written and read back on the
CPU, so a run checkpointed on a GPU resumes on a CPU-only machine and vice versa (the loop moves
the state to its device; ``Optimizer.load_state_dict`` casts to the parameters' device).

Example:
    >>> import shutil, tempfile, torch
    >>> from netpress.train.checkpoint import read_checkpoint, write_checkpoint
    >>> d = tempfile.mkdtemp()
    >>> _ = write_checkpoint(d, {"step": 3, "w": torch.ones(2)})
    >>> read_checkpoint(d)["step"]
    3
    >>> shutil.rmtree(d)
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from netpress.core.errors import ArtifactError

FILE = "checkpoint.pt"


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (nested dicts / lists / tuples) on the CPU.

    CPU tensors are returned as they are (no copy).

    Example:
        >>> import torch
        >>> from netpress.train.checkpoint import to_cpu
        >>> to_cpu({"a": [torch.ones(1)], "b": 2})["a"][0].device
        device(type='cpu')
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu() if value.device.type != "cpu" else value
    if isinstance(value, dict):
        out = {k: to_cpu(v) for k, v in value.items()}
        if isinstance(value, OrderedDict):  # a state_dict: keep its type and version metadata
            out = OrderedDict(out)
            if hasattr(value, "_metadata"):
                out._metadata = value._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def write_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (its tensors moved to the CPU) to ``directory/checkpoint.pt``.

    Returns:
        The checkpoint's path.
    """
    state = to_cpu(state)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / FILE
    tmp = d / f".{FILE}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The checkpoint in ``directory``, or ``None`` when there is none.

    Raises:
        ArtifactError: the file exists but cannot be read.
    """
    path = Path(directory) / FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any corruption becomes one typed error
        raise ArtifactError(str(path), got=f"an unreadable checkpoint ({exc})",
                            expected="a checkpoint written by netpress.train",
                            fix="delete it to start the run from scratch") from None


__all__ = ["FILE", "read_checkpoint", "to_cpu", "write_checkpoint"]
