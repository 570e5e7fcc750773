"""Empirical bias correction for static W8A8 PTQ (``quantize: {method: ptq, bias_correction: true}``).

Quantizing weights and activations shifts the mean of each layer's output (Nagel et al. 2019,
"Data-Free Quantization", §4.2: the error ``E[(W_q - W) x]`` is not zero-mean, and it is large for
BN-folded depthwise convolutions). The empirical correction measures, on calibration data only,

    target[o] = E[ y_float[o] ]       (the float, BN-folded model)
    got[o]    = E[ y_quant[o] ]       (the W8A8 model, upstream layers already corrected)

per output channel ``o`` (mean over the batch and the spatial positions) and adds
``target - got`` to the layer's float bias, which the QDQ export then stores as the int32 bias.

The correction is *sequential*: the quantized model runs once on the whole correction set as a
single batch, and each W8A8 layer corrects its own bias inside that forward pass before its output
moves on, so every layer sees inputs from already-corrected layers (no per-layer re-runs).
Linear layers (classifier logits) are left alone by default: a per-class mean over a few dozen
crops is noise, not a bias.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.nn.ptq import W8A8Conv2d
    >>> torch.manual_seed(0) and None
    >>> conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    >>> qnet = nn.Sequential(W8A8Conv2d.from_float(conv, 0.05, 128))
    >>> x = torch.randn(32, 4, 8, 8)
    >>> shift = bias_correct(nn.Sequential(conv), qnet, x)
    >>> with torch.no_grad():
    ...     err = (qnet(x) - conv(x)).mean((0, 2, 3)).abs().max()
    >>> sorted(shift) == ['0'] and float(err) < 1e-4
    True
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
import torch.nn as nn

from netpress.nn.ptq import W8A8Conv2d, W8A8Linear, fake_quant


def _channel_mean(y: torch.Tensor) -> torch.Tensor:
    """Mean per channel: ``(B, C, ...)`` -> ``(C,)`` for convs, ``(..., O)`` -> ``(O,)`` else."""
    if y.dim() > 2:
        return y.transpose(0, 1).reshape(y.shape[1], -1).mean(1)
    return y.reshape(-1, y.shape[-1]).mean(0)


@torch.no_grad()
def float_output_means(model: nn.Module, names: Iterable[str], x: torch.Tensor,
                       chunk: int = 32) -> dict[str, torch.Tensor]:
    """Per-channel output means of the named float layers over ``x`` (run in chunks)."""
    wanted = set(names)
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if name in wanted:
            def hook(_m: nn.Module, _a: tuple, y: torch.Tensor, name: str = name) -> None:
                s = _channel_mean(y.float()) * (y.shape[0] / len(x))
                sums[name] = sums[name] + s if name in sums else s
            hooks.append(m.register_forward_hook(hook))
    forward_with_hooks(model, x, chunk, hooks)
    return sums


def forward_with_hooks(model: nn.Module, x: torch.Tensor, chunk: int, hooks: list) -> None:
    """Run ``model`` (eval mode) over ``x`` in chunks of ``chunk``; remove ``hooks`` afterwards,
    whatever happens (the hooks are what collects the statistics)."""
    try:
        model.eval()
        for i in range(0, len(x), chunk):
            model(x[i:i + chunk])
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def bias_correct(float_model: nn.Module, qmodel: nn.Module, x: torch.Tensor,
                 names: Iterable[str] | None = None, include_linear: bool = False,
                 chunk: int = 32, mode: str = "output_mean") -> dict[str, float]:
    """Correct the biases of ``qmodel``'s W8A8 layers in place (see the module doc).

    Args:
        float_model: the float model whose layers have the same names (BN already folded).
        qmodel: the model holding :class:`W8A8Conv2d` / :class:`W8A8Linear` layers.
        x: the correction inputs (calibration data, one tensor; it runs as a single batch).
        names: layers to correct (default: every W8A8 conv, and linears if ``include_linear``).
        include_linear: also correct ``W8A8Linear`` layers.
        chunk: batch size of the float pass.
        mode: ``output_mean`` (match the float model's per-channel output means: corrects the
            weight and the upstream activation error) or ``weight_error`` (DFQ's correction of
            the weight-rounding error only: ``E[W x_q] - E[W_q x_q]`` on the layer's own
            quantized input).

    Returns:
        Layer name -> the largest absolute bias shift applied (for the report); layers built
        without a bias are not corrected.
    """
    qmods = {n: m for n, m in qmodel.named_modules()
             if isinstance(m, W8A8Conv2d) or (include_linear and isinstance(m, W8A8Linear))}
    if names is not None:
        keep = set(names)
        qmods = {n: m for n, m in qmods.items() if n in keep}
    if mode not in ("output_mean", "weight_error"):
        raise ValueError(f"mode must be output_mean or weight_error, not {mode!r}")
    targets = float_output_means(float_model, qmods, x, chunk) if mode == "output_mean" else {
        n: torch.zeros(0) for n in qmods}
    shifts: dict[str, float] = {}

    floats = dict(float_model.named_modules())

    def corrected(self: W8A8Conv2d | W8A8Linear, inp: torch.Tensor, name: str) -> torch.Tensor:
        y = self.accumulate(inp)
        if mode == "weight_error":  # E[W x_q] - E[W_q x_q] on the layer's own quantized input
            lo, hi = self.act_qrange
            xq = fake_quant(inp, self.input_scale, self.input_zero_point, lo, hi)
            want = _channel_mean(self._op(xq, floats[name].weight.to(xq.dtype)))
            got = _channel_mean(self._op(xq, self.dequantized_weight().to(xq.dtype)))
            delta = want - got
        else:
            delta = targets[name].to(y.dtype) - _channel_mean(y)  # (O,)
        self.bias.add_(delta)  # type: ignore[union-attr]
        shifts[name] = float(delta.abs().max())
        view = [1, -1] + [1] * (y.dim() - 2) if y.dim() > 2 else [-1]
        y = y + delta.reshape(view)
        if self.quantize_output:
            oq = self.out_qrange
            y = fake_quant(y, self.output_scale, self.output_zero_point, oq[0], oq[1])
        return y

    for name, m in qmods.items():
        if name in targets and m.bias is not None:  # a layer without a bias keeps its shift
            m.forward = types.MethodType(  # type: ignore[method-assign]
                lambda self, inp, name=name: corrected(self, inp, name), m)
    try:
        qmodel.eval()
        qmodel(x)
    finally:
        for m in qmods.values():
            m.__dict__.pop("forward", None)
    return shifts


__all__ = ["bias_correct", "float_output_means", "forward_with_hooks"]
