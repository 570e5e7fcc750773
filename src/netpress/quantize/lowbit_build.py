"""Building and reading the packed layers of the weight-only methods with small transients:
:func:`lowbit_from_codes` (codes -> ``LowBitLinear``), :func:`dequantized` (its float weight), and
:class:`_FloatTwin`, the float stand-in a sequential stage runs while later layers are captured.

The codes are packed and unpacked a few rows at a time (:func:`netpress.quantize.pack.pack` /
``unpack``, uint8 bit planes), which bounds the transient per layer.

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
    """:meth:`LowBitLinear.from_codes <netpress.nn.lowbit.LowBitLinear.from_codes>`, the codes packed
    ``rows`` output rows at a time (a multiple of 8).

    Raises:
        ValueError: a code outside ``[0, 2**bits)`` (an internal error, as in ``pack``).

    Example:
        >>> import torch
        >>> codes = torch.randint(0, 16, (100, 64)).float()
        >>> s, z = torch.rand(100, 2) + 0.1, torch.randint(0, 16, (100, 2)).float()
        >>> from netpress.nn.lowbit import LowBitLinear
        >>> ref = LowBitLinear.from_codes(codes, s, z, 4, rows=96)
        >>> torch.equal(lowbit_from_codes(codes, s, z, 4).qweight, ref.qweight)
        True
    """
    from netpress.nn.lowbit import LowBitLinear

    assert rows > 0 and rows % 8 == 0
    return LowBitLinear.from_codes(codes, scales, zeros, bits, bias, input_scale, rows=rows)


def dequantized(q: nn.Module, rows: int = 64) -> torch.Tensor:
    """The float weight ``(O, I)`` of a ``LowBitLinear``, unpacked ``rows`` output rows at a time.

    Bit-identical to ``q.dequantized_weight()`` (same element-wise ops), without the transient of
    unpacking the whole matrix at once and without touching ``q``'s own float cache; the codes
    are unpacked a slice at a time (``pack.unpack``).

    Example:
        >>> import torch.nn as nn
        >>> from netpress.nn.lowbit import LowBitLinear
        >>> q = LowBitLinear.from_float(nn.Linear(64, 100), bits=3, group_size=32)
        >>> torch.equal(dequantized(q, rows=8), q.dequantized_weight())
        True
    """
    from netpress.quantize.pack import packed_numel, unpack

    assert rows > 0 and rows % 8 == 0
    out_f, in_f, g, bits = q.out_features, q.in_features, q.group_size, q.bits
    zeros = q.zero_codes().to(torch.float32)[..., None]  # (O, G, 1)
    w = torch.empty(out_f, in_f)
    for r0 in range(0, out_f, rows):
        n = min(rows, out_f - r0)
        start = r0 * in_f * bits // 8  # a byte boundary: r0 is a multiple of 8
        codes = unpack(q.qweight[start:start + packed_numel(n * in_f, bits)], bits, n * in_f)
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
