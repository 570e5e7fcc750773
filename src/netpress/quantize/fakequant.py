"""Fake quantization for training (QAT, binary, ternary, mixed): straight-through estimators,
weight and activation quantizers, and the wrapper that trains a Linear/Conv through them.

A fake-quantized model runs in float; it is the *training* tool. After fine-tuning,
:func:`netpress.quantize.qat.convert` turns every :class:`QATWrapper` into a
:mod:`netpress.nn.qat` module that stores packed integer codes and scales.

Straight-through estimators (STE):
  * ``round_ste(x)``: forward ``round(x)``, backward identity;
  * ``sign_ste(x)``: forward ``sign(x)`` (0 maps to +1), backward ``1[|x| <= 1]`` (BinaryConnect);
  * ``grad_scale(s, g)``: forward ``s``, backward ``g · ds`` (LSQ's step-size gradient scale).

Weight quantizers (``WeightFakeQuant.mode``), ``w`` shaped ``(O, ...)``, per output channel:
  * ``int``: ``ŵ = s · clamp(round(w / s), -qmax, qmax)``, ``s = max|w| / qmax`` or, with
    ``learn_scale`` (LSQ, Esser et al. 2020), a learned ``s`` per channel;
  * ``binary`` (BWN / XNOR-Net): ``ŵ = α · sign(w)``, ``α = mean|w|`` per output channel;
  * ``binaryconnect``: ``ŵ = sign(w)`` (``α = 1``);
  * ``ternary`` (TWN, Li & Liu 2016): ``Δ = t · mean|w|`` (``t = 0.7``), ``α = mean(|w| : |w| > Δ)``,
    ``ŵ = α · sign(w) · 1[|w| > Δ]``.

Activation quantizers (``ActFakeQuant.mode``), per tensor, applied to a layer's *input*:
  * ``int``: asymmetric unsigned ``b``-bit codes ``q = clamp(round(x / s) + z, 0, 2^b - 1)``; ``s, z``
    from moving-average min/max, or ``s`` learned (LSQ) with ``z`` fixed at calibration;
  * ``sign``: ``sign(x)`` (XNOR-Net binary activations for inputs that take both signs);
  * ``step``: the {0, 1} variant with a learned scale ``s``: ``s · clamp(round(x / s), 0, 1)`` (for
    non-negative inputs, e.g. after ReLU, where ``sign`` would be constant).

Example:
    >>> import torch
    >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
    >>> y = round_ste(x); y.sum().backward()
    >>> y.tolist(), x.grad.tolist()
    ([0.0, 2.0], [1.0, 1.0])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.core.errors import DataError, ModelError
from netpress.quantize.fold import fold_batchnorm  # re-exported: the one folding routine

WEIGHT_MODES = ("int", "binary", "binaryconnect", "ternary")
ACT_MODES = ("int", "sign", "step")
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with ``sign(0) = +1`` forward; gradient passed where ``|x| <= 1`` (clipped STE).

    Example:
        >>> import torch
        >>> x = torch.tensor([-2.0, -0.5, 0.0, 0.5], requires_grad=True)
        >>> y = sign_ste(x); y.sum().backward()
        >>> y.tolist(), x.grad.tolist()
        ([-1.0, -1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0])
    """
    return _SignSTE.apply(x)


def grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    """Value ``s``, gradient ``g · ds`` (LSQ)."""
    return (s - s * g).detach() + s * g


def _channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape([-1] + [1] * (like.dim() - 1))  # (O, 1, ...)


def ternary_params(w: torch.Tensor, threshold: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN threshold ``Δ`` and scale ``α`` per output channel (axis 0) of ``w``.

    ``Δ_o = threshold · mean|w_o|``; ``α_o = mean(|w_o,i| : |w_o,i| > Δ_o)`` (0 when none exceed).

    Example:
        >>> import torch
        >>> d, a = ternary_params(torch.tensor([[1.0, -0.2, 0.6, -1.4]]))
        >>> round(d.item(), 4), round(a.item(), 4)     # Δ = 0.7·0.8; α = (1 + 0.6 + 1.4) / 3
        (0.56, 1.0)
    """
    flat = w.detach().reshape(w.shape[0], -1).abs()  # (O, K)
    delta = threshold * flat.mean(1)  # (O,)
    mask = flat > delta[:, None]  # (O, K)
    alpha = (flat * mask).sum(1) / mask.sum(1).clamp(min=1)  # (O,)
    return delta, alpha


class WeightFakeQuant(nn.Module):
    """Fake-quantizes a weight ``(O, ...)`` per output channel (see the module doc).

    Args:
        mode: ``int``, ``binary``, ``binaryconnect`` or ``ternary``.
        bits: code width for ``int`` (2..8).
        channels: output channels (for LSQ's per-channel step size).
        learn_scale: LSQ step size (``int`` only).
        threshold: TWN's ``t`` (``ternary`` only).
        per_channel: one scale per output channel (default) or one per tensor (``int`` only).
    """

    def __init__(self, mode: str, bits: int, channels: int, learn_scale: bool = False,
                 threshold: float = 0.7, per_channel: bool = True) -> None:
        super().__init__()
        assert mode in WEIGHT_MODES, mode
        self.mode, self.bits, self.threshold = mode, int(bits), float(threshold)
        self.per_channel = per_channel
        self.learn_scale = bool(learn_scale and mode == "int")
        self.qmax = (1 << (self.bits - 1)) - 1 if mode == "int" else 1
        self.scale = nn.Parameter(torch.ones(channels if per_channel else 1)) \
            if self.learn_scale else None
        self._init = False

    def _max_scale(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.detach().reshape(w.shape[0], -1).abs()  # (O, K)
        amax = flat.amax(1) if self.per_channel else flat.amax().reshape(1)
        return (amax / self.qmax).clamp(min=1e-8)  # (O,) or (1,)

    def int_scale(self, w: torch.Tensor) -> torch.Tensor:
        """The step size ``s`` (``(O,)``), learned or from max|w|."""
        if self.scale is None:
            s = self._max_scale(w)
        else:
            if not self._init:
                with torch.no_grad():
                    self.scale.copy_(self._max_scale(w))
                self._init = True
            g = 1.0 / math.sqrt(w[0].numel() * self.qmax)
            s = grad_scale(self.scale.abs().clamp(min=1e-8), g)
        return s.expand(w.shape[0]) if s.numel() == 1 else s

    def codes_and_scale(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (int8, shaped like ``w``) and per-channel scales (float32 ``(O,)``)."""
        with torch.no_grad():
            if self.mode == "int":
                s = self.int_scale(w).detach()
                q = torch.clamp(torch.round(w / _channel_view(s, w)), -self.qmax, self.qmax)
            elif self.mode in ("binary", "binaryconnect"):
                q = torch.where(w >= 0, 1.0, -1.0)
                flat = w.reshape(w.shape[0], -1).abs()  # (O, K)
                s = flat.mean(1) if self.mode == "binary" else torch.ones(w.shape[0])
            else:
                delta, s = ternary_params(w, self.threshold)
                q = torch.sign(w) * (w.abs() > _channel_view(delta, w))
        return q.to(torch.int8), s.to(torch.float32)

    def forward(self, w: torch.Tensor) -> torch.Tensor:  # (O, ...)
        if self.mode == "int":
            s = _channel_view(self.int_scale(w), w)
            q = round_ste(w / s)
            if self.scale is None:  # max|w| lies on the grid: pass gradients at the ends too
                return (q - (q - q.clamp(-self.qmax, self.qmax)).detach()) * s
            return torch.clamp(q, -self.qmax, self.qmax) * s  # LSQ: clipped values move s
        if self.mode == "binary":
            alpha = w.reshape(w.shape[0], -1).abs().mean(1)  # (O,)
            return _channel_view(alpha, w) * sign_ste(w)
        if self.mode == "binaryconnect":
            return sign_ste(w)
        q, s = self.codes_and_scale(w)
        target = q.to(w.dtype) * _channel_view(s, w)
        return w + (target - w).detach()  # STE: identity gradient to the latent weight


class ActFakeQuant(nn.Module):
    """Fake-quantizes a layer's input per tensor (see the module doc).

    Args:
        mode: ``int``, ``sign`` or ``step``.
        bits: code width for ``int`` (2..8).
        learn_scale: LSQ step size (``int``); ``step`` always learns its scale.
        momentum: moving-average factor of the min/max observer.
        where: the layer name, for errors.
    """

    def __init__(self, mode: str, bits: int = 8, learn_scale: bool = False,
                 momentum: float = 0.01, where: str = "layer") -> None:
        super().__init__()
        assert mode in ACT_MODES, mode
        self.mode, self.bits, self.where = mode, int(bits), where
        self.learn_scale = bool(learn_scale or mode == "step")
        self.momentum = momentum
        self.qmax = (1 << self.bits) - 1 if mode == "int" else 1
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.scale = nn.Parameter(torch.tensor(1.0)) if self.learn_scale else None
        self.observing = False
        self.seen = 0

    def observe(self, x: torch.Tensor) -> None:
        """Update the moving-average min/max with ``x`` (NaN/Inf raise :class:`DataError`)."""
        x = x.detach()
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"activations entering {self.where}", got="NaN/Inf values",
                            expected="finite calibration activations",
                            fix="check the data (and the model's earlier layers) for NaN/Inf")
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
        m = 1.0 if self.seen == 0 else self.momentum
        self.min_val.mul_(1 - m).add_(m * lo)
        self.max_val.mul_(1 - m).add_(m * hi)
        self.seen += 1

    def init_scale(self, x: torch.Tensor | None = None) -> None:
        """Fix the zero point and initialise a learned scale from the observed range."""
        s, z = self._observer_qparams()
        self.zero_point.fill_(z)
        if self.scale is not None:
            with torch.no_grad():
                if self.mode == "step":
                    self.scale.fill_(max(float(self.max_val) / 2, 1e-4))
                else:
                    self.scale.fill_(s)

    def _observer_qparams(self) -> tuple[float, float]:
        lo, hi = float(self.min_val), float(self.max_val)
        s = max((hi - lo) / self.qmax, 1e-8)
        z = min(max(round(-lo / s), 0), self.qmax)
        return s, float(z)

    def qparams(self) -> tuple[float, int]:
        """``(scale, zero_point)`` to freeze at conversion (float32-exact scale)."""
        if self.scale is not None:
            s = float(self.scale.detach().abs().clamp(min=1e-8))
            z = int(self.zero_point)
        else:
            s, zf = self._observer_qparams()
            z = int(zf)
        return float(torch.tensor(s, dtype=torch.float32)), z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing or (self.training and self.scale is None and self.mode == "int"):
            self.observe(x)
        if self.observing:
            return x
        if self.mode == "sign":
            return sign_ste(x)
        if self.scale is not None:
            g = 1.0 / math.sqrt(x[0].numel() * self.qmax)
            s = grad_scale(self.scale.abs().clamp(min=1e-8), g)
            z = self.zero_point
        else:
            sf, zf = self._observer_qparams()
            s, z = torch.tensor(sf, device=x.device), torch.tensor(zf, device=x.device)
        q = torch.clamp(round_ste(x / s) + z, 0, self.qmax)
        return (q - z) * s


class QATWrapper(nn.Module):
    """Trains a float Linear/Conv through a weight quantizer and an optional input quantizer.

    Args:
        layer: the float ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (its weight keeps training).
        wq: its :class:`WeightFakeQuant`.
        aq: an :class:`ActFakeQuant` for its input, or ``None`` (float input).
        name: the layer's qualified name.
    """

    def __init__(self, layer: nn.Module, wq: WeightFakeQuant, aq: ActFakeQuant | None,
                 name: str) -> None:
        super().__init__()
        self.layer, self.wq, self.aq, self.name = layer, wq, aq, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is not None:
            x = self.aq(x)
        w = self.wq(self.layer.weight)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)


def check_weight(module: nn.Module, name: str) -> None:
    """:class:`ModelError` naming ``name`` when its weight holds NaN/Inf."""
    w = module.weight.detach()
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ModelError(name, got=f"{bad} NaN/Inf values in its weight {tuple(w.shape)}",
                         expected="finite weights",
                         fix="fix the checkpoint, or add the layer to `ignore` to keep it float")


__all__ = ["ACT_MODES", "ActFakeQuant", "QATWrapper", "SUPPORTED", "WEIGHT_MODES",
           "WeightFakeQuant", "check_weight", "fold_batchnorm", "grad_scale", "round_ste",
           "sign_ste", "ternary_params"]
