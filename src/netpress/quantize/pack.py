"""Packed storage of low-bit integer codes (SPEC Q10): int4 two per byte, int2 / ternary four per byte,
binary eight per byte, any width 1..8 bit-packed little-endian.

Codes are *unsigned* here (``0 .. 2**bits - 1``); signed codes are offset by the caller (e.g. int4
``q + 8``, ternary ``{-1, 0, 1} + 1``). Packing is exact: ``unpack(pack(c, b), b, c.numel()) == c``.

Example:
    >>> import torch
    >>> from netpress.quantize.pack import pack, unpack
    >>> codes = torch.tensor([0, 15, 7, 8, 1], dtype=torch.uint8)
    >>> packed = pack(codes, bits=4)
    >>> packed.dtype, packed.numel()          # 5 codes of 4 bits -> 3 bytes
    (torch.uint8, 3)
    >>> unpack(packed, bits=4, numel=5).tolist()
    [0, 15, 7, 8, 1]
"""

from __future__ import annotations

import numpy as np
import torch


def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int, chunk: int = 1 << 16) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (any shape, values < 2**bits) into a flat uint8 tensor.

    Codes are packed ``chunk`` at a time (a multiple of 8, so every chunk ends on a byte
    boundary): the uint8 bit planes cost ``bits`` bytes per code, so packing a whole matrix at
    once would be a transient of MiB per MiniLM layer.

    Raises:
        ValueError: ``bits`` outside 1..8 or a code out of range (an internal error: callers
            validate user input first).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.detach().reshape(-1)
    if flat.numel() and (float(flat.min()) < 0 or float(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8)
    assert chunk > 0 and chunk % 8 == 0, "chunk must be a positive multiple of 8"
    if flat.numel() <= chunk:
        return _pack_bits(flat, bits)
    return torch.cat([_pack_bits(flat[i:i + chunk], bits) for i in range(0, flat.numel(), chunk)])


def _pack_bits(flat: torch.Tensor, bits: int) -> torch.Tensor:
    # uint8 bit planes (N, bits): little-endian bits of every code, 8 bits -> 1 byte (np.packbits;
    # int64 planes left tens of MiB of heap behind per MiniLM layer)
    c = flat.to(torch.uint8).cpu().numpy()
    planes = (c[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))  # ceil(N*bits/8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.numel() < packed_numel(numel, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} codes of {bits} bits")
    raw = packed.detach().reshape(-1).to(torch.uint8)
    if bits == 8:
        return raw[:numel]
    # torch ops only (no numpy): the unpacking traces into torch.export / ONNX graphs
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, the first in the low bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=raw.device)
        return ((raw[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]
    planes = (raw[:, None] >> torch.arange(8, dtype=torch.uint8, device=raw.device)) & 1
    planes = planes.reshape(-1)[: numel * bits].reshape(numel, bits)  # bit k of each code
    for k in range(1, bits):
        planes[:, 0] |= planes[:, k] << k
    return planes[:, 0].contiguous()


__all__ = ["pack", "unpack", "packed_numel"]
