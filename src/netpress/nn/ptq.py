"""W8A8 layers of static post-training quantization (SPEC Q3): ``W8A8Conv2d``, ``W8A8Linear``.

Each holds, as buffers (no pickle, all in ``model.safetensors``):

  * ``qweight``: int8 weight codes, symmetric, shaped like the float weight;
  * ``weight_scale``: float32 ``(O,)`` per output channel (or ``()`` per tensor);
  * ``bias``: the float bias (BN already folded in);
  * ``input_scale`` / ``input_zero_point``: the calibrated per-tensor activation quantizer of the
    layer's input (float32 ``()`` / int32 ``()``), codes in ``[act_qmin, act_qmax]``;
  * ``output_scale`` / ``output_zero_point``: only when ``quantize_output`` (a conv feeding a
    residual ``Add``: the ONNX graph keeps the Add in int8, so the output is quantized too).

``forward`` simulates the integer arithmetic the deployed kernels run::

    q_x  = clamp(round(x / s_x) + z_x, qmin, qmax)                 # integer input codes
    acc  = conv(q_x - z_x, q_w)                                    # the int32 accumulator
    y    = acc · (s_x · s_w[o]) + bias[o]                          # requantisation (float scale)

(computed in float32, exact while |acc| < 2^24). The ONNX form of the same layer is
``QuantizeLinear -> DequantizeLinear`` on the input, ``DequantizeLinear`` on the int8 weight and
an int32 bias — see :func:`netpress.quantize.qdq_onnx.export_qdq_onnx`, which ONNX Runtime and
OpenVINO run on integer kernels.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.nn.ptq import W8A8Conv2d
    >>> conv = nn.Conv2d(3, 8, 3, padding=1)
    >>> q = W8A8Conv2d.from_float(conv, input_scale=4 / 255, input_zero_point=128)
    >>> q.qweight.dtype, tuple(q.weight_scale.shape)
    (torch.int8, (8,))
    >>> x = torch.rand(1, 3, 8, 8) * 2 - 1
    >>> bool((q(x) - conv(x)).abs().max() < 0.05)
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.nn.registry import serializable


def _act_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
               qmax: int) -> torch.Tensor:
    """Dequantized value of ``x``'s integer code: ``s · (clamp(round(x/s) + z) - z)``."""
    z = zero_point.to(x.dtype)
    return (torch.clamp(torch.round(x / scale) + z, qmin, qmax) - z) * scale


class _W8A8(nn.Module):
    """Shared buffers and quantizers; subclasses give the linear operator."""

    qweight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor
    input_zero_point: torch.Tensor

    def _init_w8a8(self, weight_shape: tuple[int, ...], bias: bool, per_channel: bool,
                   act_bits: int, act_signed: bool, quantize_output: bool,
                   out_signed: bool) -> None:
        if not 2 <= int(act_bits) <= 8:
            raise ValueError(f"act_bits must be in 2..8, not {act_bits}")
        self.per_channel, self.act_bits, self.act_signed = per_channel, int(act_bits), act_signed
        self.quantize_output, self.out_signed = quantize_output, out_signed
        self.register_buffer("qweight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones((weight_shape[0],) if per_channel else ()))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))
        if quantize_output:
            self.register_buffer("output_scale", torch.tensor(1.0))
            self.register_buffer("output_zero_point", torch.tensor(0, dtype=torch.int32))

    @property
    def act_qrange(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the input codes."""
        return _act_range(self.act_bits, self.act_signed)

    @property
    def out_qrange(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the output codes (``quantize_output`` only)."""
        return _act_range(self.act_bits, self.out_signed)

    def set_quant(self, weight: torch.Tensor, bias: torch.Tensor | None, input_scale: float,
                  input_zero_point: int, output_qparams: tuple[float, int] | None = None,
                  weight_scale: torch.Tensor | None = None) -> None:
        """Quantize ``weight`` (symmetric int8, per channel unless built per tensor) and set the
        activation quantizers.

        Args:
            weight: the float (BN-folded) weight.
            bias: the float bias or None.
            input_scale, input_zero_point: the calibrated input quantizer.
            output_qparams: ``(scale, zero_point)`` of the output (``quantize_output`` only).
            weight_scale: a given weight scale (e.g. from an MSE observer); default max|w| / 127.
        """
        w = weight.detach().float()
        if weight_scale is None:
            amax = w.abs().reshape(w.shape[0], -1).amax(1) if self.per_channel else w.abs().amax()
            weight_scale = amax / 127.0
        weight_scale = torch.where(weight_scale > 0, weight_scale, torch.ones_like(weight_scale))
        view = [-1] + [1] * (w.dim() - 1) if self.per_channel else []
        codes = torch.clamp(torch.round(w / weight_scale.reshape(view)), -127, 127)
        with torch.no_grad():
            self.qweight.copy_(codes.to(torch.int8))
            self.weight_scale.copy_(weight_scale.float().reshape(self.weight_scale.shape))
            if bias is not None and self.bias is not None:
                self.bias.copy_(bias.detach().float())
            self.input_scale.fill_(float(input_scale))
            self.input_zero_point.fill_(int(input_zero_point))
            if self.quantize_output:
                assert output_qparams is not None
                self.output_scale.fill_(float(output_qparams[0]))
                self.output_zero_point.fill_(int(output_qparams[1]))

    def dequantized_weight(self) -> torch.Tensor:
        """``s_w · q_w`` as float32 (for the float twin used by the ONNX emitter)."""
        view = [-1] + [1] * (self.qweight.dim() - 1) if self.per_channel else []
        return self.qweight.float() * self.weight_scale.reshape(view)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _channel_view(self, y: torch.Tensor) -> list[int]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.accumulate(x)
        if self.quantize_output:
            oq = self.out_qrange
            y = fake_quant(y, self.output_scale, self.output_zero_point, oq[0], oq[1])
        return y

    def accumulate(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output before any output quantization: quantized input, integer
        accumulator, requantisation scale and float bias (see the module doc)."""
        qmin, qmax = self.act_qrange
        z = self.input_zero_point.to(x.dtype)
        codes = torch.clamp(torch.round(x / self.input_scale) + z, qmin, qmax)  # integer codes
        acc = self._op(codes - z, self.qweight.to(x.dtype))  # the int32 accumulator, in float
        view = self._channel_view(acc)
        y = acc * (self.input_scale * self.weight_scale).reshape(view if self.per_channel else [])
        if self.bias is not None:
            y = y + self.bias.reshape(view)
        return y

    def _repr(self) -> str:
        gran = "per_channel" if self.per_channel else "per_tensor"
        sign = "int8" if self.act_signed else "uint8"
        out = ", quantized output" if self.quantize_output else ""
        return f"w8 {gran}, a{self.act_bits} {sign}{out}"


@serializable
class W8A8Conv2d(_W8A8):
    """``nn.Conv2d`` on int8 weights and quantized inputs (see the module doc).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as
            ``nn.Conv2d`` (zero padding).
        per_channel: one weight scale per output channel (default) or one per tensor.
        act_bits: input code width (8); act_signed: int8 (True) or uint8 (False) input codes.
        quantize_output: also quantize the output (conv feeding a residual Add).
        out_signed: int8 output codes (True) or uint8.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 per_channel: bool = True, act_bits: int = 8, act_signed: bool = False,
                 quantize_output: bool = False, out_signed: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_w8a8(shape, bias, per_channel, act_bits, act_signed, quantize_output,
                        out_signed)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, input_scale: float, input_zero_point: int,
                   act_bits: int = 8, act_signed: bool = False, per_channel: bool = True,
                   output_qparams: tuple[float, int] | None = None, out_signed: bool = True,
                   weight_scale: torch.Tensor | None = None) -> W8A8Conv2d:
        """Quantize a float ``nn.Conv2d`` (zero padding) with the given input quantizer."""
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, conv.groups, conv.bias is not None, per_channel,
                act_bits, act_signed, output_qparams is not None, out_signed)
        q.set_quant(conv.weight, conv.bias, input_scale, input_zero_point, output_qparams,
                    weight_scale)
        return q

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-able)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, "bias": self.bias is not None,
                "per_channel": self.per_channel, "act_bits": self.act_bits,
                "act_signed": self.act_signed, "quantize_output": self.quantize_output,
                "out_signed": self.out_signed}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> W8A8Conv2d:
        """Rebuild from :meth:`spec` (tensors are loaded afterwards)."""
        return cls(**spec)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def _channel_view(self, y: torch.Tensor) -> list[int]:
        return [1, -1] + [1] * (y.dim() - 2)

    def to_float(self) -> nn.Conv2d:
        """The float conv with the dequantized weight (same names; for ONNX emission)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, self.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.groups}, {self._repr()}")


@serializable
class W8A8Linear(_W8A8):
    """``nn.Linear`` on int8 weights and quantized inputs (see the module doc and
    :class:`W8A8Conv2d` for the quantization arguments)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 per_channel: bool = True, act_bits: int = 8, act_signed: bool = False,
                 quantize_output: bool = False, out_signed: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_w8a8((out_features, in_features), bias, per_channel, act_bits, act_signed,
                        quantize_output, out_signed)

    @classmethod
    def from_float(cls, lin: nn.Linear, input_scale: float, input_zero_point: int,
                   act_bits: int = 8, act_signed: bool = False, per_channel: bool = True,
                   output_qparams: tuple[float, int] | None = None, out_signed: bool = True,
                   weight_scale: torch.Tensor | None = None) -> W8A8Linear:
        """Quantize a float ``nn.Linear`` with the given input quantizer."""
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, per_channel, act_bits,
                act_signed, output_qparams is not None, out_signed)
        q.set_quant(lin.weight, lin.bias, input_scale, input_zero_point, output_qparams,
                    weight_scale)
        return q

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-able)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "per_channel": self.per_channel,
                "act_bits": self.act_bits, "act_signed": self.act_signed,
                "quantize_output": self.quantize_output, "out_signed": self.out_signed}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> W8A8Linear:
        """Rebuild from :meth:`spec` (tensors are loaded afterwards)."""
        return cls(**spec)

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # (..., I) -> (..., O)
        return F.linear(x, w)

    def _channel_view(self, y: torch.Tensor) -> list[int]:
        return [-1]

    def to_float(self) -> nn.Linear:
        """The float linear with the dequantized weight (same names; for ONNX emission)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._repr()}"


def _pair(v: Any) -> tuple[int, int]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v), int(v))  # type: ignore[return-value]


W8A8_CLASSES: dict[type[nn.Module], type[_W8A8]] = {nn.Conv2d: W8A8Conv2d, nn.Linear: W8A8Linear}

__all__ = ["W8A8Conv2d", "W8A8Linear", "W8A8_CLASSES", "fake_quant"]
