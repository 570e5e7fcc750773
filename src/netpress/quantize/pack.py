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

import torch


def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int, chunk: int = 1 << 16) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (any shape, values < 2**bits) into a flat uint8 tensor.

    Codes are packed ``chunk`` at a time (a multiple of 8, so every chunk ends on a byte
    boundary): the bit planes cost ~8 x bits bytes per code, so packing a whole matrix at once
    would be a transient of tens of MiB for one MiniLM layer.

    Raises:
        ValueError: ``bits`` outside 1..8 or a code out of range (an internal error: callers
            validate user input first).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8)
    assert chunk > 0 and chunk % 8 == 0, "chunk must be a positive multiple of 8"
    if flat.numel() <= chunk:
        return _pack_bits(flat, bits)
    return torch.cat([_pack_bits(flat[i:i + chunk], bits) for i in range(0, flat.numel(), chunk)])


def _pack_bits(flat: torch.Tensor, bits: int) -> torch.Tensor:
    # bit planes: (N, bits) little-endian bits of every code, then 8 bits -> 1 byte
    shifts = torch.arange(bits, dtype=torch.int64)
    bitplanes = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # (N*bits,)
    pad = (-bitplanes.numel()) % 8
    if pad:
        bitplanes = torch.cat([bitplanes, bitplanes.new_zeros(pad)])
    weights = 1 << torch.arange(8, dtype=torch.int64)
    return (bitplanes.reshape(-1, 8) * weights).sum(1).to(torch.uint8)  # (ceil(N*bits/8),)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.numel() < packed_numel(numel, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} codes of {bits} bits")
    if bits == 8:
        return packed.reshape(-1)[:numel].to(torch.uint8)
    raw = packed.reshape(-1).to(torch.int64)
    bitplanes = ((raw.unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)
    bitplanes = bitplanes[: numel * bits].reshape(numel, bits)  # (N, bits)
    weights = 1 << torch.arange(bits, dtype=torch.int64)
    return (bitplanes * weights).sum(1).to(torch.uint8)


__all__ = ["pack", "unpack", "packed_numel"]
