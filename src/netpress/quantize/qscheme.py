"""Uniform affine quantization (SPEC Q1): schemes, parameters, integer codes and dequantized values.

The maths, for a real tensor ``x``, a scale ``s`` (float) and a zero point ``z`` (integer)::

    q  = clamp(round(x / s) + z, qmin, qmax)     # the integer *code*
    x̂  = s · (q - z)                             # the dequantized *value* (a float again)

Names are kept honest everywhere: ``codes`` are integer tensors, ``dequantize`` returns floats.
The fixed-point form ``x' = round(x / Q) · Q`` is the symmetric case with step ``Q``:
``round(0.75 / 0.001) = 750`` is the code, ``750 · 0.001 = 0.75`` the dequantized value.

Ranges (``signed=True``, the default, so 8-bit codes fit ``int8``):
  * symmetric: ``z = 0``, codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (the restricted range, so ``-x``
    quantizes to ``-q``), ``s = max|x| / qmax``;
  * asymmetric: codes in ``[-2^(b-1), 2^(b-1) - 1]`` (or ``[0, 2^b - 1]`` with ``signed=False``), the
    range ``[min(x, 0), max(x, 0)]`` is mapped onto ``[qmin, qmax]`` so that 0.0 is exact.

Granularity and the shapes of ``scale`` / ``zero_point`` (compact, not broadcast):
  * ``per_tensor``: ``()``;
  * ``per_channel``: ``(C,)`` with ``C = x.shape[axis]``;
  * ``per_group``: ``(C, K // group_size)``: ``x`` is seen as ``(C, K)`` (channel ``axis`` first, the
    other dims flattened) and every run of ``group_size`` consecutive values in a row shares a scale.

Example:
    >>> import torch
    >>> from netpress.quantize.qscheme import QScheme, compute_qparams, quantize, dequantize
    >>> x = torch.tensor([0.75, -0.5, 0.25])
    >>> scheme = QScheme(bits=8, symmetric=True, granularity="per_tensor")
    >>> scale, zp = compute_qparams(x, scheme)
    >>> codes = quantize(x, scale, zp, scheme)
    >>> codes.dtype, codes.tolist()
    (torch.int8, [127, -85, 42])
    >>> [round(v, 3) for v in dequantize(codes, scale, zp, scheme).tolist()]
    [0.75, -0.502, 0.248]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from netpress.core.errors import ModelError, RecipeError

GRANULARITIES = ("per_tensor", "per_channel", "per_group")


@dataclass(frozen=True)
class QScheme:
    """How a tensor is quantized: bit width, symmetry, granularity.

    Args:
        bits: code width, 2..16.
        symmetric: ``z = 0`` and a range symmetric around 0 (weights); else affine (asymmetric).
        granularity: ``per_tensor``, ``per_channel`` or ``per_group``.
        axis: the channel axis for ``per_channel`` / ``per_group`` (0 = output channels of a weight).
        group_size: values per group along the flattened non-channel dims (``per_group`` only).
        signed: signed codes (default); ``False`` gives ``[0, 2^b - 1]`` (asymmetric only).

    Raises:
        RecipeError: bits outside 2..16, an unknown granularity, a missing/useless group size, or a
            symmetric unsigned scheme.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "per_tensor"
    axis: int = 0
    group_size: int | None = None
    signed: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise RecipeError("qscheme.bits", got=self.bits, expected="an integer in 2..16",
                              fix="use e.g. bits: 8 (int8) or bits: 4 (int4)")
        if self.granularity not in GRANULARITIES:
            raise RecipeError("qscheme.granularity", got=self.granularity,
                              expected=f"one of {', '.join(GRANULARITIES)}",
                              fix="use per_channel for weights (the accurate default)")
        if self.granularity == "per_group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise RecipeError("qscheme.group_size", got=self.group_size,
                                  expected="a positive integer with per_group",
                                  fix="use e.g. group_size: 128 (or 32/64 for small layers)")
        elif self.group_size is not None:
            raise RecipeError("qscheme.group_size", got=self.group_size,
                              expected=f"no group_size with {self.granularity}",
                              fix="remove group_size, or set granularity: per_group")
        if self.symmetric and not self.signed:
            raise RecipeError("qscheme.signed", got=False, expected="signed codes when symmetric",
                              fix="use symmetric: false for unsigned (uint) codes")

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        if not self.signed:
            return 0
        half = 1 << (self.bits - 1)
        return -(half - 1) if self.symmetric else -half

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return (1 << self.bits) - 1 if not self.signed else (1 << (self.bits - 1)) - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """Smallest torch integer dtype holding every code."""
        if self.signed:
            return torch.int8 if self.bits <= 8 else torch.int16
        return torch.uint8 if self.bits <= 8 else torch.int32


def check_finite(x: torch.Tensor, where: str) -> None:
    """Raise :class:`ModelError` naming ``where`` when ``x`` holds NaN or Inf."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ModelError(where, got=f"{bad} NaN/Inf values in a tensor of shape {tuple(x.shape)}",
                         expected="finite weights",
                         fix="fix or retrain the layer (check for overflow), or add it to `ignore`")


def _channel_axis(x: torch.Tensor, scheme: QScheme, where: str) -> int:
    if x.dim() == 0:
        raise RecipeError(where, got="a 0-d tensor", expected=f"a tensor with a channel axis for "
                          f"{scheme.granularity}", fix="use granularity: per_tensor")
    axis = scheme.axis + x.dim() if scheme.axis < 0 else scheme.axis
    if not 0 <= axis < x.dim():
        raise RecipeError(where, got=f"axis {scheme.axis} for shape {tuple(x.shape)}",
                          expected=f"an axis in [-{x.dim()}, {x.dim() - 1}]",
                          fix="use axis: 0 (output channels)")
    return axis


def _rows(x: torch.Tensor, scheme: QScheme, where: str) -> torch.Tensor:
    """``x`` as a 2-D ``(R, K)`` view whose rows each get one (scale, zero point)."""
    if scheme.granularity == "per_tensor":
        return x.reshape(1, -1)
    axis = _channel_axis(x, scheme, where)
    mat = x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, K)
    if scheme.granularity == "per_channel":
        return mat
    g, k = int(scheme.group_size or 0), mat.shape[1]
    if k % g:
        divisors = [d for d in (256, 128, 64, 32, 16, 8) if k % d == 0][:3] or [k]
        raise RecipeError(where, got=f"group_size {g} for rows of {k} values (shape "
                          f"{tuple(x.shape)})", expected=f"a group size that divides {k}",
                          fix=f"use group_size {' or '.join(map(str, divisors))}, or add the "
                          "layer to `ignore`")
    return mat.reshape(-1, g)  # (C * K/g, g)


def compute_qparams(
    x: torch.Tensor, scheme: QScheme, where: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from the min/max of ``x`` (per tensor, channel or group).

    Args:
        x: the float tensor to quantize (e.g. a weight ``(O, I, kh, kw)``).
        scheme: the :class:`QScheme`.
        where: the layer name used in errors.

    Returns:
        ``(scale, zero_point)``: float32 scale and int32 zero point in the compact shapes of the
        module doc. An all-zero row gets scale 1.0.

    Raises:
        ModelError: ``x`` holds NaN or Inf. RecipeError: the group size does not divide the row.

    Example:
        >>> import torch
        >>> s, z = compute_qparams(torch.tensor([[-1.0, 3.0], [0.5, 1.0]]),
        ...                        QScheme(8, symmetric=False, granularity="per_channel"))
        >>> [round(v, 5) for v in s.tolist()], z.tolist()
        ([0.01569, 0.00392], [-64, -128])
    """
    check_finite(x, where)
    rows = _rows(x.detach().to(torch.float32), scheme, where)  # (R, K)
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)  # (R,)
    if scheme.symmetric:
        scale = torch.maximum(-lo, hi) / scheme.qmax
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = (hi - lo) / (scheme.qmax - scheme.qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round(scheme.qmin - lo / scale).clamp(scheme.qmin, scheme.qmax)
        zero_point = zero_point.to(torch.int32)
    shape = _compact_shape(x, scheme)
    return scale.reshape(shape), zero_point.reshape(shape)


def _compact_shape(x: torch.Tensor, scheme: QScheme) -> tuple[int, ...]:
    if scheme.granularity == "per_tensor":
        return ()
    axis = _channel_axis(x, scheme, "tensor")
    if scheme.granularity == "per_channel":
        return (x.shape[axis],)
    k = x.numel() // x.shape[axis]
    return (x.shape[axis], k // int(scheme.group_size or 1))


def _infer_scheme(scale: torch.Tensor, codes: torch.Tensor) -> QScheme:
    if scale.dim() == 0:
        return QScheme(granularity="per_tensor")
    if scale.dim() == 1:
        return QScheme(granularity="per_channel")
    return QScheme(granularity="per_group", group_size=(codes.numel() // scale.numel()))


def expand(t: torch.Tensor, like: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Broadcast a compact scale / zero point ``t`` against the full tensor ``like``."""
    if scheme.granularity == "per_tensor":
        return t
    axis = _channel_axis(like, scheme, "tensor")
    if scheme.granularity == "per_channel":
        shape = [1] * like.dim()
        shape[axis] = -1
        return t.reshape(shape)
    moved = list(like.movedim(axis, 0).shape)  # (C, ...)
    full = t.repeat_interleave(int(scheme.group_size or 1), dim=1)  # (C, K)
    return full.reshape(moved).movedim(0, axis)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme
) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, qmin, qmax)`` (dtype :attr:`QScheme.code_dtype`).

    Example:
        >>> import torch
        >>> s = QScheme(bits=16, granularity="per_tensor")
        >>> quantize(torch.tensor([0.75]), torch.tensor(0.001), torch.tensor(0), s).tolist()
        [750]
    """
    s = expand(scale.to(torch.float32), x, scheme)
    z = expand(zero_point.to(torch.float32), x, scheme)
    q = torch.round(x.detach().to(torch.float32) / s) + z
    return q.clamp(scheme.qmin, scheme.qmax).to(scheme.code_dtype)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    scheme: QScheme | None = None,
) -> torch.Tensor:
    """Float values ``s · (q - z)`` from integer codes.

    Args:
        codes: integer codes from :func:`quantize`.
        scale, zero_point: from :func:`compute_qparams` (compact shapes).
        scheme: gives the channel axis; when omitted it is inferred from ``scale``'s shape
            (``()`` per tensor, ``(C,)`` per channel on axis 0, ``(C, G)`` per group on axis 0).

    Returns:
        A float32 tensor shaped like ``codes``.

    Example:
        >>> import torch
        >>> x = dequantize(torch.tensor([750], dtype=torch.int16), torch.tensor(0.001),
        ...                torch.tensor(0))
        >>> x.dtype, round(x.item(), 6)
        (torch.float32, 0.75)
    """
    scheme = scheme or _infer_scheme(scale, codes)
    s = expand(scale.to(torch.float32), codes, scheme)
    z = expand(zero_point.to(torch.float32), codes, scheme)
    return (codes.to(torch.float32) - z) * s


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σx² / Σ(x - x̂)²)`` in dB (inf if exact).

    Example:
        >>> import torch
        >>> round(sqnr_db(torch.tensor([1.0, -1.0]), torch.tensor([0.9, -1.0])), 2)
        23.01
    """
    x64, e64 = x.detach().double(), (x.detach().double() - x_hat.detach().double())
    noise = float((e64 * e64).sum())
    signal = float((x64 * x64).sum())
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


__all__ = [
    "GRANULARITIES",
    "QScheme",
    "check_finite",
    "compute_qparams",
    "dequantize",
    "expand",
    "quantize",
    "sqnr_db",
]
