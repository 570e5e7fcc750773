"""Ternary weights, TWN (SPEC Q8): ``quantize: {method: ternary, ...}``.

Recipe::

    quantize: {method: ternary, threshold: 0.7, first_last_bits: 8, finetune: {epochs: 5}}

Per output channel ``o`` of a layer's weight (Li & Liu 2016, Ternary Weight Networks)::

    Δ_o = threshold · mean|w_o|                   # threshold 0.7 by default
    α_o = mean(|w_o,i| : |w_o,i| > Δ_o)
    ŵ_o,i = α_o · sign(w_o,i) · 1[|w_o,i| > Δ_o]   # codes in {-1, 0, +1}

Fine-tuning keeps a float latent weight and passes gradients straight through the ternarization.
Storage: 2 bits per weight (code + 1, four per byte) plus ``α`` in ``scale_dtype``; the first and last
quantized layers keep ``first_last_bits``-bit integer weights. Activations stay float; BatchNorm
stays float unless ``fold_bn``.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.api import quantize
    >>> X = torch.randn(64, 8); y = (X[:, 0] > 0).long()
    >>> m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> q = quantize(m, {"method": "ternary", "finetune": {"epochs": 1}}, data=(X, y))
    >>> q[2].weight_mode, q[2].qweight_packed.numel()       # 256 weights, 2 bits each
    ('ternary', 64)
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import Field

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.quantize.binary import run_lowbit
from netpress.train.loop import TrainConfig


class TernaryConfig(TechniqueConfig):
    """Config of ``ternary``.

    Attributes:
        threshold: TWN's ``t`` in ``Δ = t · mean|w|`` (0.7 in the paper).
        first_last_bits: bits (2..8) of the first and last quantized layers; ``null`` makes
            them ternary too.
        last_bits: bits (2..8) of the last layer alone, overriding ``first_last_bits`` there.
        scale_dtype: dtype of every stored per-channel scale (``α`` and the int layers' scales).
        fold_bn: fold BatchNorm into the preceding conv first (off by default).
        finetune: the shared fine-tuning loop's settings.
        targets, ignore: module patterns (default: every Linear, Conv1d and Conv2d).
    """

    method: Literal["ternary"] = "ternary"
    threshold: float = Field(default=0.7, gt=0, lt=3)
    first_last_bits: int | None = Field(default=8, ge=2, le=8, strict=True)
    last_bits: int | None = Field(default=None, ge=2, le=8, strict=True)
    scale_dtype: Literal["float16", "float32"] = "float16"
    fold_bn: bool = False
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=5, lr=1e-3))
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)


@register("quantize", "ternary", TernaryConfig,
          summary="ternary weights (TWN: Δ = 0.7·mean|W|), 2-bit packed, STE fine-tuning")
def quantize_ternary(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Ternarize the targeted layers' weights, fine-tune, pack 2 bits per weight (in place).

    Args:
        model: the model (modified and returned).
        config: a :class:`TernaryConfig`.
        ctx: fine-tuning on ``ctx.advanced["train"]`` (else ``ctx.data``);
            ``ctx.report["ternary"]`` gets layers, bytes and floats kept.

    Returns:
        The model with packed layers.

    Raises:
        RecipeError: nothing to quantize. ModelError: NaN/Inf weights, or an unsupported layer
        named in ``targets``. DataError: fine-tuning without data.

    Example:
        >>> import torch.nn as nn
        >>> ctx = StageContext()
        >>> cfg = TernaryConfig(first_last_bits=None, finetune={"epochs": 0})
        >>> m = quantize_ternary(nn.Sequential(nn.Linear(8, 2)), cfg, ctx)
        >>> m[0].qweight_packed.numel()
        4
    """
    assert isinstance(config, TernaryConfig)
    model, report = run_lowbit(
        model, ctx, method="ternary", weight_mode="ternary", act=None,
        first_last_bits=config.first_last_bits, scale_dtype=config.scale_dtype,
        fold_bn=config.fold_bn, finetune=config.finetune, targets=config.targets,
        ignore=config.ignore, threshold=config.threshold, last_bits=config.last_bits)
    ctx.report["ternary"] = {"threshold": config.threshold, **report}
    return model


__all__ = ["TernaryConfig", "quantize_ternary"]
