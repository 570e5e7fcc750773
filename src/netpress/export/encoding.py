"""Tensor encodings of the artifact's safetensors file: dense, bitmask-sparse (SPEC P8), alias.

A tensor whose zeros make ``bitmask + non-zero values`` at least :data:`SPARSE_MIN_SAVING` smaller
than dense (fp32: >= 13.1 % zeros; fp16: >= 16.3 %; int8: >= 22.5 %) is stored as ``KEY::mask``
(uint8, ``np.packbits`` of ``tensor != 0``, 8 per byte) and ``KEY::values`` (the non-zeros in flat
order). Tensors sharing storage (tied weights) are stored once as an alias of the first name.

Example:
    >>> import torch
    >>> from netpress.export.encoding import decode_tensors, encode_tensors
    >>> w = torch.zeros(4, 16); w[0, :3] = 1.0
    >>> file, entries = encode_tensors({"w": w, "w_tied": w})
    >>> entries["w"]["encoding"], entries["w_tied"]["encoding"], sorted(file)
    ('bitmask', 'alias', ['w::mask', 'w::values'])
    >>> torch.equal(decode_tensors(file, entries)["w_tied"], w)
    True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from netpress.core.errors import ArtifactError

#: sparse encoding is used when it saves at least this fraction of a tensor's dense bytes
SPARSE_MIN_SAVING = 0.10
_SEP = "::"


def encode_tensors(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Encode a state dict for the file: dense, bitmask-sparse, or alias of a tied tensor.

    Args:
        state: name -> tensor (any device; copied to CPU).

    Returns:
        ``(file_tensors, entries)``: what goes into safetensors, and the manifest's ``tensors``.

    Example:
        >>> import torch
        >>> w = torch.zeros(4, 16); w[0, :3] = 1.0  # 95 % zeros
        >>> file, entries = encode_tensors({"w": w})
        >>> entries["w"]["encoding"], sorted(file), tuple(file["w::mask"].shape)
        ('bitmask', ['w::mask', 'w::values'], (8,))
    """
    file: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key in sorted(state):
        t = state[key].detach()
        if _SEP in key:
            raise ArtifactError(key, got=f"a tensor name containing {_SEP!r}",
                                expected="module/parameter names without it",
                                fix="rename the module")
        entry: dict[str, Any] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                 t.dtype, t.device) if t.numel() else None
        if ident is not None and ident in seen:
            entries[key] = {**entry, "encoding": "alias", "of": seen[ident]}
            continue
        if ident is not None:
            seen[ident] = key
        t = t.to("cpu").contiguous()
        nnz = _sparse_nnz(t)
        if nnz is not None:
            mask = (t != 0).reshape(-1)  # (n,) bool
            file[key + _SEP + "mask"] = torch.from_numpy(np.packbits(mask.numpy()))  # (ceil(n/8),)
            file[key + _SEP + "values"] = t.reshape(-1)[mask].clone()  # (nnz,)
            entries[key] = {**entry, "encoding": "bitmask", "nnz": nnz}
        else:
            file[key] = t.clone()
            entries[key] = {**entry, "encoding": "dense"}
    return file, entries


def _sparse_nnz(t: torch.Tensor) -> int | None:
    """Non-zero count when bitmask storage pays off by :data:`SPARSE_MIN_SAVING`, else None."""
    if t.dim() == 0 or t.numel() == 0 or t.dtype == torch.bool or t.is_complex():
        return None
    n, size = t.numel(), t.element_size()
    nnz = int(torch.count_nonzero(t))
    sparse_bytes = math.ceil(n / 8) + nnz * size
    return nnz if sparse_bytes <= (1.0 - SPARSE_MIN_SAVING) * n * size else None


def decode_tensors(
    file: dict[str, torch.Tensor], entries: dict[str, Any], where: str = "model.safetensors"
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_tensors`.

    Raises:
        ArtifactError: a tensor is missing or disagrees with the manifest.
    """
    out: dict[str, torch.Tensor] = {}
    aliases = []
    used = {k + s for k, e in entries.items() for s in (
        ("",) if not isinstance(e, dict) or e.get("encoding") != "bitmask"
        else (_SEP + "mask", _SEP + "values"))}
    if set(file) - used:  # a tensor the manifest does not list was added to the file
        raise ArtifactError(f"{where}: tensor {sorted(set(file) - used)[0]!r}",
                            got="a tensor the manifest does not list",
                            expected="exactly the tensors the manifest lists",
                            fix="re-save the artifact; the file does not match its manifest")
    for key, entry in sorted(entries.items()):
        enc = entry.get("encoding") if isinstance(entry, dict) else None
        shape = tuple(entry.get("shape", ())) if isinstance(entry, dict) else ()
        try:
            if enc == "dense":
                t = file[key]
            elif enc == "bitmask":
                packed, values = file[key + _SEP + "mask"], file[key + _SEP + "values"]
                n = math.prod(shape)
                mask = torch.from_numpy(
                    np.unpackbits(packed.numpy(), count=n).astype(bool))  # (n,)
                if int(mask.sum()) != values.numel() or values.numel() != entry.get("nnz"):
                    raise ValueError("mask and values disagree")
                t = torch.zeros(n, dtype=values.dtype)
                t[mask] = values
                t = t.reshape(shape)
            elif enc == "alias":
                aliases.append((key, entry.get("of")))
                continue
            else:
                raise ValueError(f"unknown encoding {enc!r}")
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise ArtifactError(f"{where}: tensor {key!r}", got=f"{type(exc).__name__}: {exc}",
                                expected="the tensors the manifest lists",
                                fix="re-save the artifact; the file does not match its manifest"
                                ) from None
        if tuple(t.shape) != shape or _dtype_name(t.dtype) != entry.get("dtype"):
            raise ArtifactError(f"{where}: tensor {key!r}",
                                got=f"{_dtype_name(t.dtype)} {tuple(t.shape)}",
                                expected=f"{entry.get('dtype')} {shape}",
                                fix="re-save the artifact; the file does not match its manifest")
        out[key] = t
    for key, of in aliases:
        if of not in out:
            raise ArtifactError(f"{where}: tensor {key!r}", got=f"an alias of {of!r}",
                                expected="an alias of a stored tensor", fix="re-save the artifact")
        out[key] = out[of]
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["SPARSE_MIN_SAVING", "decode_tensors", "encode_tensors"]
