"""``LowBitLinear``: a Linear layer whose weight is stored as packed 2..8-bit group-wise codes (Q6/Q10).

Storage (the state dict holds only these, so the artifact really is small):

  * ``qweight``: uint8, the unsigned codes ``q ∈ [0, 2^b - 1]`` of the ``(O, I)`` weight, row-major,
    bit-packed little-endian with :func:`netpress.quantize.pack.pack` (int4: two per byte, the first
    code in the low nibble). With ``I % group_size == 0`` and 4 bits this *is* ONNX Runtime's
    ``MatMulNBits`` layout ``B[N][n_blocks][block_size / 2]``;
  * ``scales``: float32 ``(O, I / group_size)``;
  * ``qzeros``: uint8, the per-group zero codes ``(O, I / group_size)`` packed with the same bits;
  * ``input_scale`` (optional, AWQ): float32 ``(I,)``; the layer computes ``(x / s) @ ŵᵀ``;
  * ``bias``: the float bias (a parameter).

Dequantization: ``ŵ[o, i] = scales[o, i // g] · (q[o, i] - z[o, i // g])``.

Execution: in torch the codes are unpacked once (first forward in eval mode) and cached outside the
state dict, so torch runs a float matmul on the dequantized weight. For ONNX Runtime,
:func:`netpress.quantize.weight_only.export_matmul_nbits` rewrites the exported graph so every 4-bit
layer runs ``com.microsoft::MatMulNBits`` (a real int4 kernel) on these very bytes.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.nn.lowbit import LowBitLinear
    >>> lin = nn.Linear(64, 8)
    >>> q = LowBitLinear.from_float(lin, bits=4, group_size=32)
    >>> q.qweight.dtype, q.qweight.numel()        # 64*8 codes of 4 bits -> 256 bytes
    (torch.uint8, 256)
    >>> x = torch.randn(2, 64)
    >>> bool((q(x) - lin(x)).abs().max() < 0.1)
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.nn.registry import serializable
from netpress.quantize.pack import pack, packed_numel, unpack


def group_qparams(
    w: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric unsigned scale and zero code for each row of ``w`` (one group per row).

    Args:
        w: ``(R, g)`` float weights, one quantization group per row.
        bits: code width; codes lie in ``[0, 2^bits - 1]``.
        clip: shrink factor(s) of the ``[min(w, 0), max(w, 0)]`` range, scalar or ``(R,)``.

    Returns:
        ``(scale (R,), zero (R,))``: float32 scale, float32 integral zero code.
    """
    maxq = (1 << bits) - 1
    lo = w.amin(dim=1).clamp(max=0.0) * clip  # (R,)
    hi = w.amax(dim=1).clamp(min=0.0) * clip  # (R,)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w / s) + z, 0, 2^b - 1)``; ``scale``/``zero`` broadcast against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


@serializable
class LowBitLinear(nn.Module):
    """``nn.Linear`` with packed group-wise low-bit weight codes (see the module doc).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        bits: code width 2..8.
        group_size: input features per (scale, zero) group; must divide ``in_features``.
        input_scale: whether the layer divides its input by a per-channel ``input_scale`` (AWQ).

    Raises:
        ValueError: bits outside 2..8 or a group size that does not divide ``in_features``
            (callers raise the user-facing ``RecipeError`` first).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int = 128, input_scale: bool = False) -> None:
        super().__init__()
        if not 2 <= int(bits) <= 8:
            raise ValueError(f"bits must be in 2..8, not {bits}")
        if group_size < 1 or in_features % group_size:
            raise ValueError(f"group_size {group_size} must divide in_features {in_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.group_size = int(bits), int(group_size)
        groups = self.in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(
            packed_numel(self.out_features * self.in_features, self.bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(self.out_features, groups))
        self.register_buffer("qzeros", torch.zeros(
            packed_numel(self.out_features * groups, self.bits), dtype=torch.uint8))
        self.register_buffer("input_scale", torch.ones(self.in_features) if input_scale else None)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self._cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   bias: torch.Tensor | None = None,
                   input_scale: torch.Tensor | None = None, rows: int = 64) -> LowBitLinear:
        """Build from unsigned codes ``(O, I)``, scales and zero codes ``(O, I / g)``.

        The codes are packed ``rows`` output rows at a time (a multiple of 8), which bounds the
        packing transient without changing the bytes.

        Example:
            >>> import torch
            >>> codes = torch.full((2, 32), 9.0); s = torch.full((2, 1), 0.5); z = torch.full((2, 1), 8.0)
            >>> LowBitLinear.from_codes(codes, s, z, bits=4).dequantized_weight()[0, :2].tolist()
            [0.5, 0.5]
        """
        out_f, in_f = codes.shape
        group = in_f // scales.shape[1]
        q = cls(in_f, out_f, bias is not None, bits, group, input_scale is not None)
        with torch.no_grad():
            q.qweight = pack(codes.to(torch.uint8), bits, chunk=rows * in_f)
            q.scales = scales.to(torch.float32).contiguous()
            q.qzeros = pack(zeros.to(torch.uint8), bits)
            if bias is not None:
                q.bias = nn.Parameter(bias.detach().to(torch.float32).clone())
            if input_scale is not None:
                q.input_scale = input_scale.to(torch.float32).clone()
        return q

    @classmethod
    def from_float(cls, module: nn.Linear, bits: int = 4, group_size: int = 128,
                   clip: float = 1.0) -> LowBitLinear:
        """Round-to-nearest quantization of a float ``nn.Linear`` (min/max per group)."""
        w = module.weight.detach().to(torch.float32)  # (O, I)
        groups = w.reshape(-1, group_size)  # (O * I/g, g)
        scale, zero = group_qparams(groups, bits, clip)
        codes = quantize_codes(groups, scale[:, None], zero[:, None], bits).reshape(w.shape)
        shape = (w.shape[0], w.shape[1] // group_size)
        return cls.from_codes(codes, scale.reshape(shape), zero.reshape(shape), bits, module.bias)

    # -- reading -------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Unsigned codes ``(O, I)`` (uint8)."""
        n = self.out_features * self.in_features
        return unpack(self.qweight, self.bits, n).reshape(self.out_features, self.in_features)

    def zero_codes(self) -> torch.Tensor:
        """Zero codes ``(O, I / g)`` (uint8)."""
        return unpack(self.qzeros, self.bits, self.scales.numel()).reshape(self.scales.shape)

    def _dequant(self) -> torch.Tensor:
        q = self.codes().to(torch.float32).reshape(self.out_features, -1, self.group_size)
        z = self.zero_codes().to(torch.float32)[..., None]  # (O, G, 1)
        return ((q - z) * self.scales[..., None]).reshape(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight ``(O, I)`` (cached while codes and scales are unchanged)."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._dequant()
        key = tuple((t.data_ptr(), t._version) for t in (self.qweight, self.scales, self.qzeros))
        if self._cache is None or self._cache[0] != key:
            # a normal tensor even inside inference_mode: an inference tensor in the cache would
            # break a later forward that autograd records
            with torch.inference_mode(False), torch.no_grad():
                self._cache = (key, self._dequant())
        return self._cache[1]

    def float_weight(self) -> torch.Tensor:
        """The weight a float Linear applies to the raw input: ``ŵ / input_scale`` (ONNX export)."""
        w = self.dequantized_weight()
        return w / self.input_scale if self.input_scale is not None else w

    def netpress_weight_counts(self) -> tuple[int, int]:
        """``(weights, non-zero weights)`` for :func:`netpress.measure.count_params`."""
        w = self.dequantized_weight()
        nb = 0 if self.bias is None else self.bias.numel()
        nzb = 0 if self.bias is None else int(torch.count_nonzero(self.bias))
        return w.numel() + nb, int(torch.count_nonzero(w)) + nzb

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., I) -> (..., O)
        if self.input_scale is not None:
            x = x / self.input_scale
        w = self.dequantized_weight()
        return F.linear(x, w.to(x.dtype), self.bias)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-able)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "bits": self.bits, "group_size": self.group_size,
                "input_scale": self.input_scale is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LowBitLinear:
        """Rebuild from :meth:`spec` (tensors are loaded afterwards)."""
        return cls(**spec)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_cache"] = None
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}"
                + (", input_scale" if self.input_scale is not None else ""))


@serializable
class DynamicQuantLinear(nn.Module):
    """``nn.Linear`` with int8 weights and activations quantized on the fly (SPEC Q4).

    Storage: ``qweight`` int8 ``(O, I)`` symmetric codes, ``weight_scale`` float32 ``(O,)`` per
    output channel (or ``()`` per tensor), the float ``bias``. At run time the input is quantized
    per tensor to uint8 exactly as ONNX Runtime's ``DynamicQuantizeLinear`` does
    (``s = (max(x, 0) - min(x, 0)) / 255``, ``z = round(-min / s)``); the layer returns
    ``s_x · s_w · ((q_x - z) @ q_wᵀ) + b``. In torch the integer product is evaluated in float (an
    emulation); ONNX export (:func:`netpress.quantize.dynamic.export_dynamic`) runs ONNX Runtime's
    integer ``DynamicQuantizeMatMul`` kernel on the same codes.

    Example:
        >>> import torch, torch.nn as nn
        >>> lin = nn.Linear(16, 4)
        >>> q = DynamicQuantLinear.from_float(lin)
        >>> x = torch.randn(3, 16)
        >>> bool((q(x) - lin(x)).abs().max() < 0.05), q.qweight.dtype
        (True, torch.int8)
    """

    qweight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 granularity: str = "per_channel") -> None:
        super().__init__()
        if granularity not in ("per_channel", "per_tensor"):
            raise ValueError(f"granularity must be per_channel or per_tensor, not {granularity!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.granularity = granularity
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        shape = (out_features,) if granularity == "per_channel" else ()
        self.register_buffer("weight_scale", torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(cls, module: nn.Linear, granularity: str = "per_channel") -> DynamicQuantLinear:
        """Symmetric int8 codes ``round(w / s)``, ``s = max|w| / 127`` per row (or tensor)."""
        w = module.weight.detach().to(torch.float32)  # (O, I)
        amax = w.abs().amax(dim=1) if granularity == "per_channel" else w.abs().amax()
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        view = scale[:, None] if scale.dim() else scale
        q = cls(module.in_features, module.out_features, module.bias is not None, granularity)
        with torch.no_grad():
            q.qweight = torch.clamp(torch.round(w / view), -127, 127).to(torch.int8)
            q.weight_scale = scale.to(torch.float32)
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.detach().to(torch.float32).clone())
        return q

    def float_weight(self) -> torch.Tensor:
        """Dequantized weight ``(O, I)`` (what a float Linear would apply)."""
        s = self.weight_scale[:, None] if self.weight_scale.dim() else self.weight_scale
        return self.qweight.to(torch.float32) * s

    def netpress_weight_counts(self) -> tuple[int, int]:
        """``(weights, non-zero weights)`` for :func:`netpress.measure.count_params`."""
        nb = 0 if self.bias is None else self.bias.numel()
        nzb = 0 if self.bias is None else int(torch.count_nonzero(self.bias))
        return self.qweight.numel() + nb, int(torch.count_nonzero(self.qweight)) + nzb

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., I) -> (..., O)
        xf = x.to(torch.float32)
        lo, hi = xf.min().clamp(max=0.0), xf.max().clamp(min=0.0)
        sx = (hi - lo) / 255.0
        sx = torch.where(sx > 0, sx, torch.ones_like(sx))
        zx = torch.round(-lo / sx).clamp(0, 255)
        qx = torch.clamp(torch.round(xf / sx) + zx, 0, 255) - zx  # (..., I) integral values
        acc = qx @ self.qweight.to(torch.float32).T  # (..., O) integer-valued accumulators
        out = acc * (sx * self.weight_scale)
        return (out + self.bias if self.bias is not None else out).to(x.dtype)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-able)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "granularity": self.granularity}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> DynamicQuantLinear:
        """Rebuild from :meth:`spec` (tensors are loaded afterwards)."""
        return cls(**spec)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 {self.granularity}, dynamic uint8 activations")


__all__ = ["DynamicQuantLinear", "LowBitLinear", "group_qparams", "quantize_codes"]
