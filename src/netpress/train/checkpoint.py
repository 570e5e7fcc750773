"""Training checkpoints: model, optimiser, scheduler, step and RNG state, written atomically.

A checkpoint is one file ``<dir>/checkpoint.pt`` written by rank 0 (temporary file + ``fsync`` +
``os.replace``), so a run killed at any moment leaves either the previous checkpoint or the new
one, never a torn file. It holds only tensors and plain values and is read back with
``torch.load(weights_only=True)`` (no arbitrary unpickling).

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
from pathlib import Path
from typing import Any

import torch

from netpress.core.errors import ArtifactError

FILE = "checkpoint.pt"


def write_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``directory/checkpoint.pt`` and return its path."""
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


__all__ = ["FILE", "read_checkpoint", "write_checkpoint"]
