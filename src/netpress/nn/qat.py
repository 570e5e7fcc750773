"""Converted low-bit layers: ``PackedLinear``, ``PackedConv1d``, ``PackedConv2d``.

What QAT, binary, ternary and mixed-precision quantization produce. Each stores its weight as
*packed* integer codes (:func:`netpress.quantize.pack.pack`) plus one scale per output channel:

  * ``qweight_packed``: uint8, ``ceil(numel · bits / 8)`` bytes; the code of a weight is stored
    unsigned: ``int`` mode ``q + 2^(b-1)`` (``b`` bits, ``q`` in ``[-(2^(b-1)-1), 2^(b-1)-1]``),
    ``binary`` mode ``(q + 1) / 2`` (1 bit, ``q`` in {-1, +1}), ``ternary`` mode ``q + 1`` (2 bits);
  * ``weight_scale``: ``(O,)`` float32 or float16; the weight is ``ŵ = scale_o · q``;
  * ``bias``: float.

Optionally the layer's *input* is quantized with frozen parameters (``act_mode``):
  * ``int``: ``x̂ = s · (clamp(round(x / s) + z, 0, 2^b - 1) - z)``, exported to ONNX as
    ``QuantizeLinear`` → ``DequantizeLinear`` (uint8), so ONNX Runtime runs integer kernels;
  * ``sign``: ``sign(x)`` (0 → +1); ``step``: ``s · 1[round(x / s) >= 1]`` (the {0, 1} variant).

Execution: codes are unpacked once (cached) and the layer runs as its float counterpart on ``ŵ``;
in ONNX the unpacked codes are an int8 initializer behind ``DequantizeLinear``. The artifact holds
only the packed bytes and the scales.

Example:
    >>> import torch
    >>> from netpress.nn.qat import PackedLinear
    >>> q = torch.tensor([[1, -1, 1, 1], [-1, -1, 1, -1]], dtype=torch.int8)
    >>> m = PackedLinear.from_codes(q, torch.tensor([0.5, 2.0]), None, bits=1, weight_mode="binary")
    >>> m.qweight_packed.numel(), m(torch.ones(1, 4)).tolist()
    (1, [[1.0, -4.0]])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.nn.registry import serializable
from netpress.quantize.pack import pack, packed_numel, unpack

try:  # registers torch.ops.quantized_decomposed (Quantize/DequantizeLinear in ONNX)
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    _OPS: Any = torch.ops.quantized_decomposed
except Exception:  # pragma: no cover - depends on the torch build
    _OPS = None

WEIGHT_MODES = ("int", "binary", "ternary")
ACT_MODES = (None, "int", "sign", "step")
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _offset(mode: str, bits: int) -> int:
    return 1 << (bits - 1) if mode == "int" else 1


def encode_codes(q: torch.Tensor, mode: str, bits: int) -> torch.Tensor:
    """Signed codes ``q`` → packed uint8 bytes (see the module doc for the offsets)."""
    if mode == "binary":
        unsigned = (q.to(torch.int16) + 1) // 2
    else:
        unsigned = q.to(torch.int16) + _offset(mode, bits)
    return pack(unsigned.to(torch.uint8), bits)


def decode_codes(packed: torch.Tensor, mode: str, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Packed bytes → signed int8 codes of ``shape``."""
    u = unpack(packed, bits, math.prod(shape)).to(torch.int16)
    q = u * 2 - 1 if mode == "binary" else u - _offset(mode, bits)
    return q.to(torch.int8).reshape(shape)


def _exporting() -> bool:
    return bool(torch.compiler.is_compiling() and not torch.jit.is_tracing())


class _Packed(nn.Module):
    """Shared packed storage, decoding cache and input quantization."""

    weight_shape: tuple[int, ...]

    def _init_packed(self, shape: tuple[int, ...], bias: bool, bits: int, weight_mode: str,
                     scale_dtype: str, act_mode: str | None, act_bits: int, act_scale: float,
                     act_zero_point: int) -> None:
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, not {weight_mode!r}")
        need = {"binary": 1, "ternary": 2}.get(weight_mode)
        if (need is not None and bits != need) or not 1 <= int(bits) <= 8:
            raise ValueError(f"bits={bits} does not fit weight_mode={weight_mode!r}")
        if act_mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {ACT_MODES}, not {act_mode!r}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}")
        self.weight_shape = tuple(int(s) for s in shape)
        self.bits, self.weight_mode, self.scale_dtype = int(bits), weight_mode, scale_dtype
        self.act_mode, self.act_bits = act_mode, int(act_bits)
        self.act_scale, self.act_zero_point = float(act_scale), int(act_zero_point)
        numel = math.prod(self.weight_shape)
        self.register_buffer("qweight_packed",
                             torch.zeros(packed_numel(numel, self.bits), dtype=torch.uint8))
        self.register_buffer("weight_scale",
                             torch.ones(self.weight_shape[0], dtype=SCALE_DTYPES[scale_dtype]))
        self.bias = nn.Parameter(torch.zeros(self.weight_shape[0])) if bias else None
        self._cache: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def set_codes(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Store signed codes ``q`` (shape of the weight), scales ``(O,)`` and the bias."""
        assert tuple(q.shape) == self.weight_shape, (q.shape, self.weight_shape)
        with torch.no_grad():
            self.qweight_packed = encode_codes(q, self.weight_mode, self.bits)
            self.weight_scale = scale.detach().to(SCALE_DTYPES[self.scale_dtype]).reshape(-1)
            if bias is not None and self.bias is not None:
                self.bias.copy_(bias.detach())
        self._cache = None

    def codes(self) -> torch.Tensor:
        """The signed int8 codes (unpacked, cached)."""
        return self._decoded()[0]

    def _decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple((t.data_ptr(), t._version) for t in (self.qweight_packed, self.weight_scale))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                q = decode_codes(self.qweight_packed, self.weight_mode, self.bits,
                                 self.weight_shape)
                view = [-1] + [1] * (q.dim() - 1)
                w = q.to(torch.float32) * self.weight_scale.to(torch.float32).reshape(view)
            self._cache = (key, q, w)
        return self._cache[1], self._cache[2]

    def dequantized_weight(self) -> torch.Tensor:
        """``scale_o · q`` as float32 (in ONNX: ``DequantizeLinear`` on int8 codes)."""
        if _exporting() and _OPS is not None:
            # the codes cached by an eager forward become an int8 initializer
            q = self._cache[1] if self._cache is not None else decode_codes(
                self.qweight_packed, self.weight_mode, self.bits, self.weight_shape)
            out = self.weight_shape[0]
            qmax = (1 << (self.bits - 1)) - 1 if self.weight_mode == "int" else 1
            return _OPS.dequantize_per_channel(
                q, self.weight_scale.to(torch.float32), torch.zeros(out, dtype=torch.long), 0,
                -qmax, qmax, torch.int8)
        return self._decoded()[1]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the frozen input quantization (identity when ``act_mode`` is None)."""
        if self.act_mode is None:
            return x
        if self.act_mode == "sign":
            return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
        s = self.act_scale
        if self.act_mode == "step":
            return torch.where(torch.round(x / s) >= 1, torch.full_like(x, s), torch.zeros_like(x))
        qmax, z = (1 << self.act_bits) - 1, self.act_zero_point
        if _OPS is not None:
            q = _OPS.quantize_per_tensor(x, s, z, 0, qmax, torch.uint8)
            return _OPS.dequantize_per_tensor(q, s, z, 0, qmax, torch.uint8)
        return (torch.clamp(torch.round(x / s) + z, 0, qmax) - z) * s  # pragma: no cover

    def netpress_weight_counts(self) -> tuple[int, int]:
        """Logical ``(weights + biases, non-zeros)``: packed bytes hold several weights each."""
        total, nonzero = math.prod(self.weight_shape), int(torch.count_nonzero(self.codes()))
        if self.bias is not None:
            total, nonzero = total + self.bias.numel(), nonzero + int(torch.count_nonzero(self.bias))
        return total, nonzero

    def weight_bytes(self) -> int:
        """Bytes of the stored weight tensors: packed codes + scales."""
        return (self.qweight_packed.numel() +
                self.weight_scale.numel() * self.weight_scale.element_size())

    def _packed_spec(self) -> dict[str, Any]:
        return {"bias": self.bias is not None, "bits": self.bits,
                "weight_mode": self.weight_mode, "scale_dtype": self.scale_dtype,
                "act_mode": self.act_mode, "act_bits": self.act_bits,
                "act_scale": self.act_scale, "act_zero_point": self.act_zero_point}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_cache"] = None
        return state

    def _packed_repr(self) -> str:
        act = "" if self.act_mode is None else (
            f", act={self.act_mode}" + (f"{self.act_bits}" if self.act_mode == "int" else ""))
        return f"{self.weight_mode}{self.bits}{act}"

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   layer: nn.Module | None = None, **kwargs: Any) -> Any:
        """Build from signed codes; ``layer`` (a float Linear/Conv) gives the shape arguments."""
        if cls is PackedLinear:
            args: dict[str, Any] = {"in_features": q.shape[1], "out_features": q.shape[0]}
        else:
            assert layer is not None
            args = {k: getattr(layer, k) for k in ("in_channels", "out_channels", "kernel_size",
                                                   "stride", "padding", "dilation", "groups")}
        m = cls(**args, bias=bias is not None, **kwargs)
        m.set_codes(q, scale, bias)
        return m


@serializable
class PackedLinear(_Packed):
    """``nn.Linear`` with packed low-bit weight codes (see the module doc).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        bits, weight_mode, scale_dtype: code width 1..8, ``int`` / ``binary`` / ``ternary``,
            ``float32`` / ``float16`` scales.
        act_mode, act_bits, act_scale, act_zero_point: frozen input quantization (optional).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 weight_mode: str = "int", scale_dtype: str = "float32",
                 act_mode: str | None = None, act_bits: int = 8, act_scale: float = 1.0,
                 act_zero_point: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_packed((self.out_features, self.in_features), bias, bits, weight_mode,
                          scale_dtype, act_mode, act_bits, act_scale, act_zero_point)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-able)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                **self._packed_spec()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> PackedLinear:
        """Rebuild from :meth:`spec` (tensors are loaded afterwards)."""
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, ..., in) -> (B, ..., out)
        return F.linear(self.quantize_input(x), self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self._packed_repr()}"


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * n


class _PackedConvNd(_Packed):
    _nd = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 bits: int = 4, weight_mode: str = "int", scale_dtype: str = "float32",
                 act_mode: str | None = None, act_bits: int = 8, act_scale: float = 1.0,
                 act_zero_point: int = 0) -> None:
        super().__init__()
        n = self._nd
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride = _tuple(kernel_size, n), _tuple(stride, n)
        self.dilation = _tuple(dilation, n)
        self.padding: Any = padding if isinstance(padding, str) else _tuple(padding, n)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._init_packed(shape, bias, bits, weight_mode, scale_dtype, act_mode, act_bits,
                          act_scale, act_zero_point)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-able)."""
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": padding, "dilation": list(self.dilation), "groups": self.groups,
                **self._packed_spec()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Any:
        """Rebuild from :meth:`spec` (tensors are loaded afterwards)."""
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, *spatial)
        conv = F.conv1d if self._nd == 1 else F.conv2d
        return conv(self.quantize_input(x), self.dequantized_weight(), self.bias, self.stride,
                    self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, {self._packed_repr()}")


@serializable
class PackedConv1d(_PackedConvNd):
    """``nn.Conv1d`` with packed low-bit weight codes (see the module doc)."""

    _nd = 1


@serializable
class PackedConv2d(_PackedConvNd):
    """``nn.Conv2d`` with packed low-bit weight codes (see the module doc)."""

    _nd = 2


#: float class -> its low-bit replacement
PACKED_CLASSES: dict[type[nn.Module], type[_Packed]] = {
    nn.Linear: PackedLinear, nn.Conv1d: PackedConv1d, nn.Conv2d: PackedConv2d,
}

__all__ = ["PACKED_CLASSES", "PackedConv1d", "PackedConv2d", "PackedLinear", "decode_codes",
           "encode_codes"]
