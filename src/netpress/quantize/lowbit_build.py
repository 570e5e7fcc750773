"""Building and reading the packed layers of the weight-only methods with small transients:
:func:`lowbit_from_codes` (codes -> ``LowBitLinear``), :func:`dequantized` (its float weight), and
:class:`_FloatTwin`, the float stand-in a sequential stage runs while later layers are captured.

The codes go through uint8 bit planes (``np.packbits`` / ``np.unpackbits``) a few rows at a time:
the bytes of :func:`netpress.quantize.pack.pack`, where its int64 bit planes left tens of MiB of
heap behind per MiniLM layer.

Example:
    >>> import torch
    >>> codes = torch.randint(0, 16, (16, 64)).float()
    >>> q = lowbit_from_codes(codes, torch.ones(16, 2), torch.full((16, 2), 8.0), 4)
    >>> torch.equal(dequantized(q), codes - 8.0)
    True
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def lowbit_from_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                      rows: int = 64) -> nn.Module:
    """:meth:`LowBitLinear.from_codes <netpress.nn.lowbit.LowBitLinear.from_codes>` with the codes
    packed ``rows`` output rows at a time through uint8 bit planes (:func:`_pack_rows`): the same
    bytes, with a transient of ``bits`` bytes per code of one slice, where the int64 bit planes
    left tens of MiB of heap behind per MiniLM layer (they set the peak RSS of MiniLM GPTQ).

    Raises:
        ValueError: a code outside ``[0, 2**bits)`` (an internal error, as in ``pack``).

    Example:
        >>> import torch
        >>> codes = torch.randint(0, 16, (100, 64)).float()
        >>> s, z = torch.rand(100, 2) + 0.1, torch.randint(0, 16, (100, 2)).float()
        >>> from netpress.nn.lowbit import LowBitLinear
        >>> ref = LowBitLinear.from_codes(codes, s, z, 4, rows=100)
        >>> torch.equal(lowbit_from_codes(codes, s, z, 4).qweight, ref.qweight)
        True
    """
    from netpress.nn.lowbit import LowBitLinear
    from netpress.quantize.pack import pack

    assert rows > 0 and rows % 8 == 0
    out_f, in_f = codes.shape
    q = LowBitLinear(in_f, out_f, bias is not None, bits, in_f // scales.shape[1],
                     input_scale is not None)
    with torch.no_grad():
        q.qweight = _pack_rows(codes, bits, rows)
        q.scales = scales.to(torch.float32).contiguous()
        q.qzeros = pack(zeros.to(torch.uint8), bits)
        if bias is not None:
            q.bias = nn.Parameter(bias.detach().to(torch.float32).clone())
        if input_scale is not None:
            q.input_scale = input_scale.to(torch.float32).clone()
    return q


def _pack_rows(codes: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """The bytes of ``pack(codes.to(uint8), bits)`` (little-endian bit stream), ``rows`` rows of
    ``codes (O, I)`` at a time with uint8 bit planes and ``np.packbits``."""
    import numpy as np

    c = codes.detach().to(torch.uint8).numpy()
    if c.size and (float(codes.min()) < 0 or float(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    out_f, in_f = c.shape
    out = np.empty(-(-out_f * in_f * bits // 8), dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.uint8)
    for r0 in range(0, out_f, rows):
        part = c[r0:r0 + rows].reshape(-1)
        planes = (part[:, None] >> shifts) & 1  # (n, bits) uint8
        start = r0 * in_f * bits // 8  # a byte boundary: r0 is a multiple of 8
        packed = np.packbits(planes.reshape(-1), bitorder="little")
        out[start:start + len(packed)] = packed
        del planes, packed
    return torch.from_numpy(out)


def _unpack_rows(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first ``numel`` codes of ``packed`` (uint8), as ``pack.unpack`` gives them, through
    ``np.unpackbits`` (uint8 bit planes, not int64)."""
    import numpy as np

    planes = np.unpackbits(packed.numpy(), count=numel * bits, bitorder="little")
    planes = planes.reshape(numel, bits)
    codes = planes[:, 0].copy()
    for k in range(1, bits):
        codes |= planes[:, k] << np.uint8(k)
    return torch.from_numpy(codes)


def dequantized(q: nn.Module, rows: int = 64) -> torch.Tensor:
    """The float weight ``(O, I)`` of a ``LowBitLinear``, unpacked ``rows`` output rows at a time.

    Bit-identical to ``q.dequantized_weight()`` (same element-wise ops), without the transient of
    unpacking the whole matrix at once and without touching ``q``'s own float cache; the codes
    are unpacked through uint8 bit planes (:func:`_unpack_rows`).

    Example:
        >>> import torch.nn as nn
        >>> from netpress.nn.lowbit import LowBitLinear
        >>> q = LowBitLinear.from_float(nn.Linear(64, 100), bits=3, group_size=32)
        >>> torch.equal(dequantized(q, rows=8), q.dequantized_weight())
        True
    """
    from netpress.quantize.pack import packed_numel

    assert rows > 0 and rows % 8 == 0
    out_f, in_f, g, bits = q.out_features, q.in_features, q.group_size, q.bits
    zeros = q.zero_codes().to(torch.float32)[..., None]  # (O, G, 1)
    w = torch.empty(out_f, in_f)
    for r0 in range(0, out_f, rows):
        n = min(rows, out_f - r0)
        start = r0 * in_f * bits // 8  # a byte boundary: r0 is a multiple of 8
        codes = _unpack_rows(q.qweight[start:start + packed_numel(n * in_f, bits)], bits, n * in_f)
        codes = codes.to(torch.float32).reshape(n, -1, g)
        w[r0:r0 + n] = ((codes - zeros[r0:r0 + n]) * q.scales[r0:r0 + n, :, None]).reshape(n, in_f)
    return w


class _FloatTwin(nn.Module):
    """Stand-in for a freshly quantized ``LowBitLinear`` while the sequential stage runs: the same
    forward on its dequantized weight (:func:`dequantized`), so the later layers' inputs are exactly
    those of the quantized model, without the layer unpacking its codes (and caching a float copy)
    inside the stage. :func:`_sequential` puts the real module back once its block is passed."""

    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        self.weight = dequantized(q)
        self.bias, self.input_scale = q.bias, q.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale
        return F.linear(x, self.weight.to(x.dtype), self.bias)


__all__ = ["dequantized", "lowbit_from_codes"]
