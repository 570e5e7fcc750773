"""Sizes in bytes: what is really on disk, and a quick in-memory estimate.

Example:
    >>> import torch
    >>> from netpress.measure.size import state_dict_bytes
    >>> state_dict_bytes(torch.nn.Linear(4, 3))  # 15 float32 values
    60
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from netpress.core.errors import ArtifactError


def file_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a file, or of every regular file under a directory (recursively).

    Sizes are ``stat`` sizes (``st_size``), not allocated blocks; symbolic links are not followed
    and count 0, so nothing outside the artifact is measured.

    Args:
        path: a file (e.g. ``model.onnx``) or a directory (e.g. an artifact directory).

    Returns:
        The total size in bytes.

    Raises:
        ArtifactError: ``path`` does not exist.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = pathlib.Path(d, "a.bin").write_bytes(b"1234")
        ...     _ = pathlib.Path(d, "sub").mkdir()
        ...     _ = pathlib.Path(d, "sub", "b.bin").write_bytes(b"56")
        ...     file_bytes(d)
        6
    """
    target = Path(path)
    if not target.exists() and not target.is_symlink():
        raise ArtifactError(
            str(target),
            got="a missing path",
            expected="a file or directory",
            fix="check the path; export or save the artifact first",
        )
    if target.is_symlink():
        return 0
    if target.is_file():
        return target.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(target):  # os.walk does not follow directory links
        for name in files:
            entry = Path(root, name)
            if not entry.is_symlink() and entry.is_file():
                total += entry.stat().st_size
    return total


def state_dict_bytes(model: nn.Module) -> int:
    """Sum of ``nbytes`` of the tensors in ``model.state_dict()`` (shared storage counted once).

    A quick estimate of an uncompressed save; it ignores file headers and does not see sparse or
    entropy-coded storage, so report :func:`file_bytes` of the written artifact instead.

    Args:
        model: any ``nn.Module``.

    Returns:
        Bytes of the tensor data.

    Example:
        >>> import torch
        >>> state_dict_bytes(torch.nn.Linear(4, 3).half())
        30
    """
    seen: set[tuple[int, int, int]] = set()
    total = 0
    for tensor in model.state_dict().values():
        if not hasattr(tensor, "nbytes"):
            continue
        key = (tensor.data_ptr(), tensor.nbytes, tensor.numel())
        if tensor.nbytes and key in seen:
            continue  # tied weights appear twice in a state dict
        seen.add(key)
        total += int(tensor.nbytes)
    return total


__all__ = ["file_bytes", "state_dict_bytes"]
