"""Binary weights (SPEC Q7): ``quantize: {method: binary, variant: ..., activations: ...}``.

Recipe::

    quantize: {method: binary, variant: bwn, activations: float, first_last_bits: 8,
               finetune: {epochs: 5, lr: 0.001}}

Variants (weights ``w`` of a layer, per output channel ``o``):
  * ``binaryconnect`` (Courbariaux et al. 2015): ``ŵ = sign(w)``;
  * ``bwn`` (Binary-Weight-Network, Rastegari et al. 2016): ``ŵ = α_o · sign(w)``, ``α_o = mean|w_o|``;
  * ``xnor`` (XNOR-Net): BWN weights *and* binary inputs (``activations: binary`` by default).

Binary activations: an input that takes both signs becomes ``sign(x)``; an input that is never
negative (after ReLU ``sign`` would be constant) uses the {0, 1} variant with a learned scale,
``s · 1[x >= s / 2]`` (an LSQ step). Gradients pass straight through (clipped STE).

The first and last quantized layers keep ``first_last_bits``-bit integer weights (per-channel
symmetric, float input) unless ``first_last_bits: null``. BatchNorm stays float (``fold_bn: false``,
the BNN practice; it absorbs the weight scale for BinaryConnect). Storage: 1 bit per weight
(8 per byte, :func:`netpress.quantize.pack.pack`) plus ``α`` in ``scale_dtype`` per output channel.
Execution: the codes are unpacked at load and the layer runs in float on ``α · sign``
(``ctx.report["binary"]["execution"]`` says so).

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.api import quantize
    >>> X = torch.randn(64, 8); y = (X[:, 0] > 0).long()
    >>> m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> q = quantize(m, {"method": "binary", "finetune": {"epochs": 1}}, data=(X, y))
    >>> [q[i].weight_mode + str(q[i].bits) for i in (0, 2, 4)]
    ['int8', 'binary1', 'int8']
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn as nn
from pydantic import Field

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.data import Batch  # noqa: F401  (used by the doctest)
from netpress.quantize.fakequant import fold_batchnorm
from netpress.quantize.qat import (
    calibrate,
    convert,
    prepare,
    select_layers,
    size_summary,
    train,
    train_batches,
)
from netpress.train.loop import TrainConfig


class BinaryConfig(TechniqueConfig):
    """Config of ``binary``.

    Attributes:
        variant: ``binaryconnect``, ``bwn`` or ``xnor``.
        activations: ``float`` or ``binary`` (default: ``binary`` for xnor, else ``float``).
        first_last_bits: bits (2..8) of the first and last quantized layers; ``null`` binarizes
            them too.
        last_bits: bits (1..8) of the last layer alone, overriding ``first_last_bits`` there (the
            classifier often holds most of a small CNN's weights); 1 binarizes it.
        scale_dtype: dtype of every stored per-channel scale (``α`` and the scales of the
            ``first_last_bits`` layers): ``float16`` or ``float32``.
        fold_bn: fold BatchNorm into the preceding conv first (off by default).
        finetune: the shared fine-tuning loop's settings.
        targets, ignore: module patterns (default: every Linear, Conv1d and Conv2d).
    """

    method: Literal["binary"] = "binary"
    variant: Literal["binaryconnect", "bwn", "xnor"] = "bwn"
    activations: Literal["float", "binary"] | None = None
    first_last_bits: int | None = Field(default=8, ge=2, le=8, strict=True)
    last_bits: int | None = Field(default=None, ge=1, le=8, strict=True)
    scale_dtype: Literal["float16", "float32"] = "float16"
    fold_bn: bool = False
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=5, lr=1e-3))
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)


def run_lowbit(model: nn.Module, ctx: StageContext, *, method: str, weight_mode: str,
               act: dict[str, Any] | None, first_last_bits: int | None, scale_dtype: str,
               fold_bn: bool, finetune: TrainConfig, targets: list[str] | None,
               ignore: list[str], threshold: float = 0.7, last_bits: int | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Shared body of ``binary`` and ``ternary``: plan, wrap, calibrate, fine-tune, convert.

    Returns:
        The model and the report dict (layers, bytes, layers kept float, fine-tuning log).
    """
    folded = fold_batchnorm(model) if fold_bn else []
    layers, kept = select_layers(model, targets, ignore, method)
    edge = {layers[0][0]: first_last_bits, layers[-1][0]: first_last_bits}
    if last_bits is not None:
        edge[layers[-1][0]] = None if last_bits == 1 else last_bits
    edge = {k: v for k, v in edge.items() if v is not None}
    plan: dict[str, dict[str, Any]] = {}
    for name, _ in layers:
        if name in edge:
            plan[name] = {"mode": "int", "bits": edge[name], "act": None}
        else:
            plan[name] = {"mode": weight_mode, "threshold": threshold, "act": act}
    wrappers = prepare(model, layers, plan)
    calibrate(model, wrappers, list(ctx.data or []))
    log = train(model, train_batches(ctx), finetune)
    # every per-channel scale in scale_dtype: float16 changes a scale by < 2^-11 relative, far
    # below the 1/127 step of an 8-bit code
    converted = convert(model, wrappers, scale_dtype)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    summary = size_summary(converted)
    report = {"folded_bn": folded, "first_last": sorted(edge), "first_last_bits": first_last_bits,
              "bits_per_layer": {n: v["bits"] for n, v in converted.items()},
              "layers": converted, "kept_float": kept, "finetune": log, **summary,
              "other_tensor_bytes": state_bytes - summary["weight_bytes"],
              "weight_bytes_note": f"packed codes + per-channel scales ({scale_dtype}) of every "
                                   "quantized layer (int first/last layers included); biases and "
                                   "BN stay float32 and are counted in other_tensor_bytes",
              "execution": "codes unpacked at load; layers run in float on scale·code "
                           "(ONNX: DequantizeLinear on int8 codes)"}
    return model.eval(), report


@register("quantize", "binary", BinaryConfig,
          summary="binary weights (BinaryConnect / BWN / XNOR-Net), 8 per byte, STE fine-tuning")
def quantize_binary(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Binarize the targeted layers' weights (and optionally inputs), fine-tune, pack (in place).

    Args:
        model: the model (modified and returned).
        config: a :class:`BinaryConfig`.
        ctx: calibration in ``ctx.data``; fine-tuning on ``ctx.advanced["train"]`` (else
            ``ctx.data``); ``ctx.report["binary"]`` gets layers, bits, bytes and floats kept.

    Returns:
        The model with packed layers.

    Raises:
        RecipeError: nothing to quantize. ModelError: NaN/Inf weights, or an unsupported layer
        (e.g. an Embedding) named in ``targets``. DataError: missing data, NaN/Inf activations.

    Example:
        >>> import torch, torch.nn as nn
        >>> ctx = StageContext(data=[Batch((torch.randn(8, 4),), torch.zeros(8).long())])
        >>> cfg = BinaryConfig(first_last_bits=None, finetune={"epochs": 0})
        >>> m = quantize_binary(nn.Sequential(nn.Linear(4, 2)), cfg, ctx)
        >>> m[0].qweight_packed.numel(), ctx.report["binary"]["layers"]["0"]["bits"]
        (1, 1)
    """
    assert isinstance(config, BinaryConfig)
    activations = config.activations or ("binary" if config.variant == "xnor" else "float")
    weight_mode = "binaryconnect" if config.variant == "binaryconnect" else "binary"
    act = {"mode": "step"} if activations == "binary" else None  # step → sign if inputs < 0
    model, report = run_lowbit(
        model, ctx, method="binary", weight_mode=weight_mode, act=act,
        first_last_bits=config.first_last_bits, scale_dtype=config.scale_dtype,
        fold_bn=config.fold_bn, finetune=config.finetune, targets=config.targets,
        ignore=config.ignore, last_bits=config.last_bits)
    ctx.report["binary"] = {"variant": config.variant, "activations": activations, **report}
    return model


__all__ = ["BinaryConfig", "quantize_binary", "run_lowbit"]
