"""``SmoothQuantLinear``: a W8A8 ``nn.Linear`` whose input is divided by a per-channel smoothing
factor before its per-tensor quantizer (SmoothQuant, Xiao et al. 2023).

Buffers (no pickle, all in ``model.safetensors``):

  * ``smooth``: float32 ``(I,)``, the factor ``s`` of each input channel;
  * ``qweight``: int8 codes of ``W · diag(s)`` (symmetric, one scale per output channel);
  * ``weight_scale``: float32 ``(O,)``;
  * ``input_scale`` / ``input_zero_point``: the per-tensor uint8 quantizer of ``x / s``;
  * ``bias``: the float bias (or absent).

``forward`` simulates the integer arithmetic the deployed kernels run::

    q_x = clamp(round((x / s) / s_x) + z_x, 0, 255)       # uint8 codes of the smoothed input
    acc = (q_x - z_x) @ q_wᵀ                               # the int32 accumulator
    y   = acc · (s_x · s_w[o]) + bias[o]

Since ``(x / s) · (W · diag(s))ᵀ = x · Wᵀ``, smoothing changes nothing in float; it moves the
activation outliers of a few input channels into the weights, where per-channel scales absorb
them. The ONNX form (:func:`netpress.quantize.smooth.export_smoothquant_onnx`) is
``Mul(1/s) -> QuantizeLinear -> DequantizeLinear -> MatMul(DequantizeLinear(int8 W·diag(s)))``,
which OpenVINO and ONNX Runtime run on integer kernels (the ``Mul`` is an element-wise op that
OpenVINO fuses into the quantizer's producer).

Example:
    >>> import torch, torch.nn as nn
    >>> lin = nn.Linear(8, 4)
    >>> q = SmoothQuantLinear.from_float(lin, torch.ones(8), input_scale=8 / 255, zero_point=128)
    >>> x = torch.rand(3, 8) * 8 - 4
    >>> bool((q(x) - lin(x)).abs().max() < 0.1)
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.nn.registry import serializable


@serializable
class SmoothQuantLinear(nn.Module):
    """W8A8 ``nn.Linear`` with per-channel input smoothing (see the module doc).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
    """

    smooth: torch.Tensor
    qweight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor
    input_zero_point: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("smooth", torch.ones(in_features))
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(cls, lin: nn.Linear, smooth: torch.Tensor, input_scale: float,
                   zero_point: int, weight_scale: torch.Tensor | None = None, qmax: int = 127
                   ) -> SmoothQuantLinear:
        """Quantize ``lin``: int8 codes of ``W · diag(smooth)``, the given input quantizer.

        Args:
            lin: the float layer.
            smooth: ``(in_features,)`` positive factors.
            input_scale, zero_point: the uint8 quantizer of ``x / smooth``.
            weight_scale: ``(out_features,)`` scales (default ``max|W·diag(s)| / qmax`` per row).
            qmax: the largest weight code (127; 63 against int8 overflow, see
                :mod:`netpress.quantize.overflow`).

        Returns:
            The quantized layer.

        Example:
            >>> q = SmoothQuantLinear.from_float(nn.Linear(4, 2), torch.ones(4), 0.1, 0)
            >>> q.qweight.dtype
            torch.int8
        """
        q = cls(lin.in_features, lin.out_features, lin.bias is not None)
        s = smooth.detach().float().reshape(-1)
        w = lin.weight.detach().float() * s[None, :]
        if weight_scale is None:
            weight_scale = w.abs().amax(1) / float(qmax)
        weight_scale = torch.where(weight_scale > 0, weight_scale, torch.ones_like(weight_scale))
        codes = torch.clamp(torch.round(w / weight_scale[:, None]), -qmax, qmax)
        with torch.no_grad():
            q.smooth.copy_(s)
            q.qweight.copy_(codes.to(torch.int8))
            q.weight_scale.copy_(weight_scale.float())
            q.input_scale.fill_(float(input_scale))
            q.input_zero_point.fill_(int(zero_point))
            if lin.bias is not None and q.bias is not None:
                q.bias.copy_(lin.bias.detach().float())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.input_zero_point.to(x.dtype)
        codes = torch.clamp(torch.round(x / self.smooth / self.input_scale) + z, 0, 255)
        acc = F.linear(codes - z, self.qweight.to(x.dtype))  # the int32 accumulator, in float
        y = acc * (self.input_scale * self.weight_scale)
        return y + self.bias if self.bias is not None else y

    def smoothed_weight(self) -> torch.Tensor:
        """``s_w · q_w`` (the dequantized ``W · diag(s)``) as float32."""
        return self.qweight.float() * self.weight_scale[:, None]

    def to_float(self) -> nn.Linear:
        """A float ``nn.Linear`` holding the dequantized ``W · diag(s)`` (the ONNX emitter's twin;
        its input must be divided by ``smooth`` to be equivalent)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.smoothed_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-able)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SmoothQuantLinear:
        """Rebuild from :meth:`spec` (tensors are loaded afterwards)."""
        return cls(**spec)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                "w8 per_channel, a8 uint8 per_tensor, smoothed input")


__all__ = ["SmoothQuantLinear"]
