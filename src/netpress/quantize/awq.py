"""AWQ-style activation-aware weight quantization (Lin et al. 2023), per Linear layer.

``quantize: {method: awq, weights: {bits: 4, group_size: 128}, grid: 20}``

Input channels that carry large activations matter more. For a layer with calibration inputs
``X (N, I)`` the per-channel statistic ``a = mean|X|`` gives candidate scales ``s = a^α`` (normalised
to a geometric mean of 1), α on a grid in ``[0, 1)``; for each, the weight ``W · diag(s)`` is
quantized round-to-nearest and the output error ``‖X Wᵀ - (X / s) Q(W · diag(s))ᵀ‖²`` measured on the
calibration inputs; the best α wins (α = 0 is plain RTN, so AWQ never does worse than RTN on the
calibration data). The layer keeps ``s`` as ``input_scale`` and divides its input by it.

Example:
    >>> import torch
    >>> from netpress.quantize.awq import awq_layer
    >>> _ = torch.manual_seed(0); w = torch.randn(8, 64); x = torch.randn(256, 64) * torch.rand(64) * 4
    >>> codes, scales, zeros, s, alpha = awq_layer(w, x, bits=4, group_size=32)
    >>> s.shape, 0.0 <= alpha < 1.0
    (torch.Size([64]), True)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.quantize.weight_only import AWQConfig, quantize_linears, rtn_codes

MAX_ROWS = 4096  # calibration rows used in the search (a strided subsample)


def awq_layer(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, grid: int = 20,
              clip_search: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Search the activation-aware scale of one layer, then quantize ``W · diag(s)``.

    Args:
        w: the float weight ``(O, I)``.
        x: its calibration inputs ``(N, I)``.
        bits, group_size: code width and group size.
        grid: number of α values tried in ``[0, 1)``.
        clip_search: MSE search of each group's clipping range.

    Returns:
        ``(codes (O, I), scales (O, I/g), zeros (O, I/g), input_scale (I,), alpha)``.
    """
    w = w.detach().to(torch.float32)
    if x.shape[0] > MAX_ROWS:
        x = x[:: -(-x.shape[0] // MAX_ROWS)]
    x = x.to(torch.float32)  # (N, I)
    ref = x @ w.T  # (N, O)
    act = x.abs().mean(0).clamp(min=1e-8)  # (I,)
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in (k / grid for k in range(grid)):
        s = act.pow(alpha)
        s = s / torch.sqrt(s.max() * s.min())  # (I,)
        codes, scales, zeros = rtn_codes(w * s, bits, group_size, search=False)
        deq = ((codes.reshape(w.shape[0], -1, group_size) - zeros[..., None])
               * scales[..., None]).reshape(w.shape)  # (O, I)
        err = float(((x / s) @ deq.T - ref).pow(2).mean())
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    _, alpha, s = best
    codes, scales, zeros = rtn_codes(w * s, bits, group_size, clip_search)
    return codes, scales, zeros, s, alpha


@register("quantize", "awq", AWQConfig,
          summary="weight-only int2..int8 with activation-aware per-channel scaling (AWQ), packed")
def quantize_awq(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """AWQ-style quantization of the targeted Linear layers (in place), in forward order.

    Args:
        model: the model (modified and returned).
        config: an :class:`~netpress.quantize.weight_only.AWQConfig`.
        ctx: ``ctx.data`` holds the calibration batches; ``ctx.report["awq"]`` is filled (with the
            α chosen per layer).

    Returns:
        ``model`` with :class:`~netpress.nn.lowbit.LowBitLinear` layers (with ``input_scale``).

    Raises:
        DataError / RecipeError / ModelError: see
        :func:`netpress.quantize.weight_only.quantize_linears`.

    Example:
        >>> import torch, torch.nn as nn
        >>> from netpress.core.data import Batch
        >>> ctx = StageContext(data=[Batch((torch.randn(64, 32),))])
        >>> m = quantize_awq(nn.Sequential(nn.Linear(32, 4)), AWQConfig(weights={"group_size": 32}), ctx)
        >>> m[0].input_scale.shape
        torch.Size([32])
    """
    from netpress.nn.lowbit import LowBitLinear

    assert isinstance(config, AWQConfig)
    bits, group = config.weights.bits, config.weights.group_size
    alphas: dict[str, float] = {}

    def layer(name: str, module: nn.Linear, x: torch.Tensor | None) -> nn.Module:
        assert x is not None
        codes, scales, zeros, s, alpha = awq_layer(module.weight, x, bits, group, config.grid,
                                                   config.clip_search)
        alphas[name] = alpha
        return LowBitLinear.from_codes(codes, scales, zeros, bits, module.bias, input_scale=s)

    model = quantize_linears(model, config, ctx, layer, needs_data=True)
    ctx.report["awq"]["alpha"] = alphas
    return model


__all__ = ["awq_layer", "quantize_awq"]
