"""Weight-quantized layers: ``QuantLinear``, ``QuantConv1d``, ``QuantConv2d``.

Each holds its weight as integer codes and runs as its float counterpart on the dequantized
weight ``ŵ = scale · (qweight - zero_point)``:

  * ``qweight``: integer codes shaped like the float weight: int8 for 2..8 bits, int16 for
    9..16 (Q1's full range);
  * ``scale``: float32, ``(O,)`` per output channel or ``()`` per tensor;
  * ``zero_point``: the codes' dtype, same shape as ``scale`` (all zeros when symmetric);
  * ``bias``: the float bias, unchanged (a parameter).

The state dict holds only those: an int8 model is ~1/4 of the fp32 bytes. In eval mode the
dequantized weight is cached (outside the state dict) so torch latency is not penalised; the
cache is rebuilt whenever the codes or scales change. Under ``torch.export`` / ``torch.onnx.export``
the dequantization is emitted as ``quantized_decomposed.dequantize_per_*``, which the ONNX exporter
turns into ``DequantizeLinear`` on an int8 initializer, so the ONNX file stays int8 too.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.nn.quant import QuantLinear
    >>> lin = nn.Linear(16, 4)
    >>> q = QuantLinear.from_float(lin, bits=8)
    >>> q.qweight.dtype, tuple(q.scale.shape)
    (torch.int8, (4,))
    >>> x = torch.randn(2, 16)
    >>> bool((q(x) - lin(x)).abs().max() < 0.05)
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.core.errors import ModelError
from netpress.nn.registry import serializable
from netpress.quantize.qscheme import QScheme, compute_qparams, quantize

try:  # registers torch.ops.quantized_decomposed (DequantizeLinear in ONNX, loadable .pt2)
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    _HAS_DECOMPOSED = hasattr(torch.ops.quantized_decomposed, "dequantize_per_channel")
except Exception:  # pragma: no cover - depends on the torch build
    _HAS_DECOMPOSED = False

WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")


def _tracing() -> bool:
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling())


def _exporting() -> bool:
    """torch.export / dynamo (not TorchScript tracing, which cannot lower quantized_decomposed)."""
    return bool(torch.compiler.is_compiling() and not torch.jit.is_tracing())


class _QuantWeight(nn.Module):
    """Shared storage, dequantization and caching of the int8 weight codes."""

    qweight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def _init_quant(
        self, weight_shape: tuple[int, ...], bias: bool, bits: int, symmetric: bool,
        granularity: str,
    ) -> None:
        if granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"granularity must be one of {WEIGHT_GRANULARITIES}, not "
                             f"{granularity!r}")
        if not 2 <= int(bits) <= 16:
            raise ValueError(f"bits must be in 2..16, not {bits}")
        self.bits, self.symmetric, self.granularity = int(bits), bool(symmetric), granularity
        self.qscheme = QScheme(self.bits, self.symmetric, granularity, axis=0)
        qshape = (weight_shape[0],) if granularity == "per_channel" else ()
        store = self.storage_dtype
        self.register_buffer("qweight", torch.zeros(weight_shape, dtype=store))
        self.register_buffer("scale", torch.ones(qshape, dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros(qshape, dtype=store))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
        self._cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @property
    def storage_dtype(self) -> torch.dtype:
        """int8 for 2..8-bit codes, int16 for 9..16 bits."""
        return torch.int8 if self.bits <= 8 else torch.int16

    def _set_from_float(self, weight: torch.Tensor, bias: torch.Tensor | None, where: str) -> None:
        scale, zero_point = compute_qparams(weight, self.qscheme, where)
        codes = quantize(weight, scale, zero_point, self.qscheme)  # shape of weight
        with torch.no_grad():
            self.qweight = codes.to(self.storage_dtype)
            self.scale = scale.to(torch.float32)
            self.zero_point = zero_point.to(self.storage_dtype)
            if bias is not None:
                self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def _dequant_eager(self) -> torch.Tensor:
        view = [-1] + [1] * (self.qweight.dim() - 1) if self.scale.dim() else []
        zp = self.zero_point.to(torch.float32).reshape(view)
        return (self.qweight.to(torch.float32) - zp) * self.scale.reshape(view)

    def _dequant_traced(self) -> torch.Tensor:
        qmin, qmax = self.qscheme.qmin, self.qscheme.qmax
        ops = torch.ops.quantized_decomposed
        out = self.qweight.shape[0]
        # per tensor goes through the per-channel op too (a broadcast scale): the ONNX exporter
        # only lowers per-tensor dequantization with a Python-number zero point
        scale = self.scale.reshape(-1).expand(out)  # (O,)
        zero_point = self.zero_point.long().reshape(-1).expand(out)  # (O,)
        return ops.dequantize_per_channel(self.qweight, scale, zero_point, 0, qmin, qmax,
                                          torch.int8)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight ``scale · (qweight - zero_point)`` (cached in eval mode)."""
        if _tracing():  # int16 codes: Cast/Sub/Mul (DequantizeLinear has no int16 before opset 21)
            return self._dequant_traced() if (_HAS_DECOMPOSED and _exporting()
                                               and self.bits <= 8) else self._dequant_eager()
        if self.training:
            self._cache = None
            return self._dequant_eager()
        key = tuple((t.data_ptr(), t._version, t.device)
                    for t in (self.qweight, self.scale, self.zero_point))
        if self._cache is None or self._cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # never an inference tensor
                self._cache = (key, self._dequant_eager())
        return self._cache[1]

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight()
        return w.to(x.dtype) if x.is_floating_point() and x.dtype != w.dtype else w

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_cache"] = None
        return state

    def _quant_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, {self.granularity}"


@serializable
class QuantLinear(_QuantWeight):
    """``nn.Linear`` with int8 weight codes (see the module doc).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        bits: code width 2..16; symmetric: zero point 0; granularity: per_channel or per_tensor.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8,
                 symmetric: bool = True, granularity: str = "per_channel") -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_quant((self.out_features, self.in_features), bias, bits, symmetric, granularity)

    @classmethod
    def from_float(cls, module: nn.Linear, bits: int = 8, symmetric: bool = True,
                   granularity: str = "per_channel", where: str = "Linear") -> QuantLinear:
        """Quantize a float ``nn.Linear`` (weights min/max, round to nearest).

        Raises:
            ModelError: the weight holds NaN/Inf (named by ``where``).
        """
        q = cls(module.in_features, module.out_features, module.bias is not None, bits,
                symmetric, granularity)
        q._set_from_float(module.weight, module.bias, where)
        return q.to(module.weight.device)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-able)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "bits": self.bits, "symmetric": self.symmetric,
                "granularity": self.granularity}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> QuantLinear:
        """Rebuild from :meth:`spec` (tensors are loaded afterwards)."""
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., I) -> (..., O)
        return F.linear(x, self._weight_for(x), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._quant_repr()}")


class _QuantConvNd(_QuantWeight):
    _nd = 2
    _conv = staticmethod(F.conv2d)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 bits: int = 8, symmetric: bool = True, granularity: str = "per_channel") -> None:
        super().__init__()
        nd = self._nd
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _tuple(kernel_size, nd)
        self.stride, self.dilation = _tuple(stride, nd), _tuple(dilation, nd)
        self.padding = padding if isinstance(padding, str) else _tuple(padding, nd)
        if in_channels % groups or out_channels % groups:
            raise ValueError("in_channels and out_channels must be divisible by groups")
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_quant(shape, bias, bits, symmetric, granularity)

    @classmethod
    def from_float(cls, module: nn.Conv1d | nn.Conv2d, bits: int = 8, symmetric: bool = True,
                   granularity: str = "per_channel", where: str = "Conv") -> _QuantConvNd:
        """Quantize a float ``nn.ConvNd`` (zero padding only).

        Raises:
            ModelError: NaN/Inf weights, or a padding mode other than ``zeros``.
        """
        if getattr(module, "padding_mode", "zeros") != "zeros":
            raise ModelError(where, got=f"padding_mode={module.padding_mode!r}",
                             expected="padding_mode='zeros'",
                             fix="add this layer to `ignore` (it stays float)")
        q = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                module.padding, module.dilation, module.groups, module.bias is not None, bits,
                symmetric, granularity)
        q._set_from_float(module.weight, module.bias, where)
        return q.to(module.weight.device)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-able)."""
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": padding, "dilation": list(self.dilation), "groups": self.groups,
                "bias": self.bias is not None, "bits": self.bits, "symmetric": self.symmetric,
                "granularity": self.granularity}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> _QuantConvNd:
        """Rebuild from :meth:`spec` (tensors are loaded afterwards)."""
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, *spatial)
        return self._conv(x, self._weight_for(x), self.bias, self.stride,
                          self.padding, self.dilation, self.groups)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"bias={self.bias is not None}, {self._quant_repr()}")


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * n


@serializable
class QuantConv1d(_QuantConvNd):
    """``nn.Conv1d`` with int8 weight codes (see the module doc and :class:`QuantLinear`)."""

    _nd = 1
    _conv = staticmethod(F.conv1d)


@serializable
class QuantConv2d(_QuantConvNd):
    """``nn.Conv2d`` with int8 weight codes (see the module doc and :class:`QuantLinear`)."""

    _nd = 2
    _conv = staticmethod(F.conv2d)


#: float class -> its weight-quantized replacement
QUANT_CLASSES: dict[type[nn.Module], type[_QuantWeight]] = {
    nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d,
}

__all__ = ["QUANT_CLASSES", "QuantConv1d", "QuantConv2d", "QuantLinear", "WEIGHT_GRANULARITIES"]
