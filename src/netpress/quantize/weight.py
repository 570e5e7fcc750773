"""Weight-only int8 quantization: ``quantize: {method: int8_weight, ...}``.

Every targeted ``Linear`` / ``Conv1d`` / ``Conv2d`` is replaced by its :mod:`netpress.nn.quant`
counterpart holding integer codes (bits 2..8 stored one code per int8; 9..16 one per int16), a
float32 scale per output channel (or per tensor) and the float bias. Activations stay float. The
artifact's weights shrink to ~1/4 of fp32 (~1/2 with int16 codes); ONNX export emits
``DequantizeLinear`` on the int8 weights (int16 codes: ``Cast``/``Sub``/``Mul``, still integer in
the file).

The handler modifies the model it is given in place (the pipeline and :func:`netpress.quantize`
pass a copy they own) and returns it. ``ctx.report["int8_weight"]`` lists the layers quantized and
those kept in float with the reason.

Example:
    >>> import torch.nn as nn
    >>> from netpress.api import quantize
    >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> q = quantize(model, {"method": "int8_weight", "ignore": ["2"]})
    >>> [type(m).__name__ for m in q]
    ['QuantLinear', 'ReLU', 'Linear']
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn as nn
from pydantic import Field

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.errors import ModelError, RecipeError
from netpress.core.targeting import select
from netpress.quantize.fold import fold_batchnorm

DEFAULT_TARGETS = (nn.Linear, nn.Conv1d, nn.Conv2d)


class WeightQuantConfig(TechniqueConfig):
    """Config of ``int8_weight``.

    Attributes:
        bits: code width 2..16 (codes stored one per int8 up to 8 bits, one per int16 above).
        granularity: ``per_channel`` (one scale per output channel, the accurate default) or
            ``per_tensor``.
        symmetric: zero point 0 (default); ``false`` stores an int8 zero point per scale.
        targets: module patterns to quantize (default: every Linear, Conv1d and Conv2d).
        ignore: module patterns kept in float.
        fold_bn: fold each ``Conv -> BatchNorm`` pair first (default), so the exported graph has
            one conv per pair (unfolded, ONNX Runtime ran MobileNetV2 0.84x of fp32).
    """

    method: Literal["int8_weight"] = "int8_weight"
    bits: int = Field(default=8, ge=2, le=16, strict=True)
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    symmetric: bool = True
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)
    fold_bn: bool = True


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@register("quantize", "int8_weight", WeightQuantConfig,
          summary="weight-only integer codes (2..8 bits in int8, 9..16 in int16, per-channel "
                  "scales); activations stay float")
def quantize_int8_weight(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Replace targeted Linear/Conv modules of ``model`` (in place) by int8-weight modules.

    Args:
        model: the model to quantize (modified and returned).
        config: a :class:`WeightQuantConfig`.
        ctx: the stage context; ``ctx.report["int8_weight"]`` is filled.

    Returns:
        ``model`` with ``QuantLinear`` / ``QuantConv1d`` / ``QuantConv2d`` in place of the targets.

    Raises:
        RecipeError: the targets select no quantizable module.
        ModelError: a targeted weight holds NaN/Inf (the layer is named).

    Example:
        >>> import torch.nn as nn
        >>> from netpress.core.config import StageContext
        >>> ctx = StageContext()
        >>> m = quantize_int8_weight(nn.Sequential(nn.Linear(4, 4)), WeightQuantConfig(), ctx)
        >>> ctx.report["int8_weight"]["quantized"]
        ['0']
    """
    from netpress.nn.quant import QUANT_CLASSES  # here: netpress.nn imports this package

    assert isinstance(config, WeightQuantConfig)
    folded = fold_batchnorm(model) if config.fold_bn else []
    chosen = select(model, config.targets, config.ignore, default=DEFAULT_TARGETS,
                    where="quantize.targets")
    quantized: list[str] = []
    kept: list[dict[str, str]] = []
    for name, module in chosen:
        qcls = QUANT_CLASSES.get(type(module))
        if qcls is None:
            kept.append({"name": name, "reason": f"{type(module).__name__} has no int8-weight "
                         f"version (supported: Linear, Conv1d, Conv2d)"})
            continue
        try:
            qmod = qcls.from_float(module, bits=config.bits, symmetric=config.symmetric,  # type: ignore[attr-defined]
                                   granularity=config.granularity, where=name)
        except ModelError as exc:
            if "padding_mode" not in str(exc):
                raise
            kept.append({"name": name, "reason": f"padding_mode={module.padding_mode!r} "
                         "(only zero padding is supported)"})
            continue
        _set_submodule(model, name, qmod)
        quantized.append(name)
    if not quantized:
        raise RecipeError(
            "quantize.targets", got=config.targets or "the default (Linear, Conv1d, Conv2d)",
            expected="at least one Linear/Conv1d/Conv2d module to quantize",
            fix="check `targets` / `ignore` (`netpress inspect` lists module names)"
            + (f"; kept in float: {kept}" if kept else ""),
        )
    report: dict[str, Any] = {"bits": config.bits, "granularity": config.granularity,
                              "symmetric": config.symmetric, "quantized": quantized,
                              "kept_float": kept, "folded_batchnorm_into": folded}
    ctx.report["int8_weight"] = report
    return model


__all__ = ["WeightQuantConfig", "quantize_int8_weight"]
