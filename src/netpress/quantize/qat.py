"""Quantization-aware training (SPEC Q5): ``quantize: {method: qat, ...}``.

Recipe::

    quantize: {method: qat, weights: {bits: 4, granularity: per_channel},
               activations: {bits: 8}, learn_scale: false, finetune: {epochs: 3, lr: 0.001},
               distill: {teacher: original, temperature: 4, alpha: 0.9}}   # distill: optional

Steps: (1) BatchNorm layers that follow a conv are folded into it (``fold_bn``), so the integer
model has no float BN; (2) every targeted Linear/Conv is wrapped in a
:class:`~netpress.quantize.fakequant.QATWrapper`: weights fake-quantized per output channel
(symmetric, ``bits``), the layer's input fake-quantized per tensor (asymmetric uint, ``activations.bits``),
with straight-through gradients; ``learn_scale: true`` learns the step sizes (LSQ); (3) activation
ranges are calibrated on the calibration batches; (4) the model is fine-tuned with the shared loop
:func:`netpress.train.fine_tune` on the training split (``ctx.advanced["train"]``, else
``ctx.data``), on the labels or, with ``distill``, against the float original model
(quantization-aware distillation, :class:`QATDistill`), pruned zeros kept at zero;
(5) :func:`convert` replaces every wrapper by a :class:`~netpress.nn.qat.PackedLinear` /
``PackedConv1d`` / ``PackedConv2d`` holding packed codes (``bits`` per weight), float32 scales
and the frozen input quantization, which exports to ONNX as QDQ (int8 weights, uint8
activations) for ONNX Runtime's integer kernels.

The helpers :func:`prepare`, :func:`calibrate`, :func:`train` and :func:`convert` are shared by the
binary, ternary and mixed-precision techniques.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.api import quantize
    >>> X = torch.randn(64, 8); y = (X[:, 0] > 0).long()
    >>> m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> q = quantize(m, {"method": "qat", "finetune": {"epochs": 1}}, data=(X, y))
    >>> [type(l).__name__ for l in q]
    ['PackedLinear', 'ReLU', 'PackedLinear']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.data import Batch
from netpress.core.errors import DataError, ModelError, RecipeError
from netpress.core.targeting import select
from netpress.quantize.fakequant import (
    SUPPORTED,
    ActFakeQuant,
    QATWrapper,
    WeightFakeQuant,
    check_weight,
    fold_batchnorm,
)
from netpress.quantize.overflow import OverflowFix, overflow_note, weight_bits
from netpress.train.callbacks import KeepSparsity
from netpress.train.loop import TrainConfig, fine_tune


class QATWeights(BaseModel):
    """Weight quantization of QAT: ``bits`` 2..8, symmetric, per output channel or per tensor;
    ``overflow_fix`` (``auto`` / ``on`` / ``off``): 8-bit weights train and export as 7-bit codes
    where int8 kernels saturate (:mod:`netpress.quantize.overflow`)."""

    model_config = ConfigDict(extra="forbid")
    bits: int = Field(default=4, ge=2, le=8, strict=True)
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    overflow_fix: OverflowFix = "auto"


class QATActivations(BaseModel):
    """Input quantization of every quantized layer: asymmetric uint ``bits`` 2..8, per tensor."""

    model_config = ConfigDict(extra="forbid")
    bits: int = Field(default=8, ge=2, le=8, strict=True)


class QATDistill(BaseModel):
    """Quantization-aware distillation (SPEC D4 after quantization): while the fake-quantized
    model trains, a float teacher supervises it with the loss of ``distill: {method: kd}``
    (Hinton KD for classifiers, cosine for embeddings; ``1 - alpha`` on the labels when the
    batches have them). ``teacher: original`` is the uncompressed model of the run,
    ``input`` the model as this stage received it (e.g. after pruning)."""

    model_config = ConfigDict(extra="forbid")
    teacher: Literal["original", "input"] = "original"
    temperature: float = Field(default=4.0, gt=0, le=100)
    alpha: float = Field(default=0.9, ge=0, le=1)
    form: Literal["kl", "soft_ce"] = "kl"
    loss: Literal["auto", "kd", "cosine", "mse"] = "auto"


class QATConfig(TechniqueConfig):
    """Config of ``qat``.

    Attributes:
        weights: bit width and granularity of the weight codes.
        activations: input quantization of each quantized layer (``null`` keeps inputs float).
        learn_scale: LSQ: learn the weight and activation step sizes during fine-tuning.
        fold_bn: fold BatchNorm into the preceding conv first (the integer model has no BN).
        finetune: the shared fine-tuning loop's settings. Weights that are exactly zero when
            QAT starts (a pruned model) stay zero (:class:`~netpress.train.KeepSparsity`).
        distill: ``{teacher: original, temperature, alpha}``: train against a float teacher
            instead of the labels alone (:class:`QATDistill`); ``null`` (default): labels only.
        targets, ignore: module patterns (default: every Linear, Conv1d and Conv2d).
    """

    method: Literal["qat"] = "qat"
    weights: QATWeights = Field(default_factory=QATWeights)
    activations: QATActivations | None = Field(default_factory=QATActivations)
    learn_scale: bool = False
    fold_bn: bool = True
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=3, lr=1e-3))
    distill: QATDistill | None = None
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------------- shared helpers
def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def select_layers(model: nn.Module, targets: list[str] | None, ignore: list[str],
                  method: str) -> tuple[list[tuple[str, nn.Module]], list[dict[str, str]]]:
    """Targeted Linear/Conv layers and the modules kept float (with the reason).

    Raises:
        ModelError: a module named exactly in ``targets`` cannot take ``method`` (e.g. binary on
            an ``Embedding``).
        RecipeError: nothing to quantize.
    """
    chosen = select(model, targets, ignore, default=SUPPORTED, where="quantize.targets")
    layers, kept = [], []
    exact = set(targets or [])
    for name, module in chosen:
        if isinstance(module, SUPPORTED) and getattr(module, "padding_mode", "zeros") == "zeros":
            check_weight(module, name)
            layers.append((name, module))
            continue
        if list(module.children()):  # a container matched by a regex: its layers count
            continue
        reason = (f"{type(module).__name__} cannot take {method} quantization "
                  "(supported: Linear, Conv1d, Conv2d with zero padding)")
        if name in exact:
            raise ModelError(name, got=type(module).__name__,
                             expected=f"a Linear/Conv1d/Conv2d for method {method}",
                             fix=f"remove {name!r} from `targets` (it stays float), or use "
                             "int8_weight / dynamic quantization for it")
        kept.append({"name": name, "reason": reason})
    if not layers:
        raise RecipeError("quantize.targets", got=targets or "the default (Linear, Conv1d, Conv2d)",
                          expected="at least one Linear/Conv1d/Conv2d module",
                          fix="check `targets` / `ignore` (`netpress inspect` lists module names)")
    return layers, kept


WeightSpec = Callable[[int, str, nn.Module], dict[str, Any] | None]


def prepare(model: nn.Module, layers: list[tuple[str, nn.Module]],
            plan: dict[str, dict[str, Any]]) -> list[QATWrapper]:
    """Wrap each planned layer in place.

    Args:
        model: modified in place.
        layers: ``(name, module)`` from :func:`select_layers`.
        plan: per layer name ``{"mode", "bits", "learn_scale", "threshold", "per_channel",
            "act": None | {"mode", "bits", "learn_scale"}}``; layers absent from it stay float.

    Returns:
        The wrappers, in layer order.
    """
    wrappers = []
    for name, module in layers:
        p = plan.get(name)
        if p is None:
            continue
        wq = WeightFakeQuant(p["mode"], p.get("bits", 8), module.weight.shape[0],
                             learn_scale=p.get("learn_scale", False),
                             threshold=p.get("threshold", 0.7),
                             per_channel=p.get("per_channel", True))
        act = p.get("act")
        aq = None if act is None else ActFakeQuant(act["mode"], act.get("bits", 8),
                                                   learn_scale=act.get("learn_scale", False),
                                                   where=name)
        wrapper = QATWrapper(module, wq, aq, name).to(module.weight.device)
        _set_submodule(model, name, wrapper)
        wrappers.append(wrapper)
    return wrappers


def calibrate(model: nn.Module, wrappers: list[QATWrapper], batches: list[Batch],
              max_batches: int = 16) -> None:
    """Observe activation ranges on ``batches`` (float forward) and initialise the scales.

    Raises:
        DataError: no batches while activations are quantized; NaN/Inf activations.
    """
    aqs = [w.aq for w in wrappers if w.aq is not None]
    if not aqs:
        return
    if not batches:
        raise DataError("calibration data", got="no batches",
                        expected="batches to calibrate activation ranges",
                        fix="pass calibration data, or set activations: null")
    was = model.training
    model.eval()
    for aq in aqs:
        aq.observing = True
    try:
        with torch.no_grad():
            for b in batches[:max_batches]:
                b.run(model)
    finally:
        for aq in aqs:
            aq.observing = False
        model.train(was)
    for aq in aqs:
        if aq.mode == "sign" or (aq.mode == "step" and float(aq.min_val) < 0):
            aq.mode, aq.learn_scale, aq.scale = "sign", False, None
        aq.init_scale()


def train_batches(ctx: StageContext) -> list[Batch]:
    """The fine-tuning split: ``ctx.advanced["train"]`` when given, else ``ctx.data``."""
    adv = ctx.advanced if isinstance(ctx.advanced, dict) else {}
    batches = adv.get("train") or ctx.data or []
    return list(batches)


def train(model: nn.Module, batches: list[Batch], config: TrainConfig,
          teacher: nn.Module | None = None, distill: QATDistill | None = None) -> dict[str, Any]:
    """Fine-tune through the shared loop; returns ``{"steps", "losses"}`` for the report.

    Weights that are exactly zero at the start (a pruned model) are kept at zero. With a
    ``teacher`` and ``distill`` settings the loss is :func:`netpress.distill.distill`'s.

    Raises:
        DataError: epochs > 0 without labelled batches.
    """
    if config.epochs == 0:
        return {"steps": 0, "losses": []}
    if not batches:
        raise DataError("fine-tuning data", got="no batches",
                        expected="labelled training batches for the fine-tuning",
                        fix="pass training data, or set finetune: {epochs: 0}")
    if teacher is not None and distill is not None:
        from netpress.distill.kd import DistillConfig
        from netpress.distill.kd import distill as run_distill

        cfg = DistillConfig(method="kd", keep_sparsity=True, **distill.model_dump())
        _student, result = run_distill(model, teacher, batches, cfg, train=config)
    else:
        result = fine_tune(model, batches, config, callbacks=[KeepSparsity(model)])
    return {"steps": result.steps, "losses": [round(v, 5) for v in result.losses]}


def qat_teacher(model: nn.Module, distill: QATDistill | None, ctx: StageContext) -> nn.Module | None:
    """The float teacher of quantization-aware distillation (``None`` without ``distill``).

    Raises:
        RecipeError: ``teacher: original`` where the run has no original model.
    """
    if distill is None:
        return None
    from netpress.distill.kd import stage_teacher  # netpress.distill imports this package

    return stage_teacher(distill.teacher, model, ctx, "quantize.distill.teacher",
                         fix="use distill: {teacher: input}, or netpress.api.apply / compress")


def convert(model: nn.Module, wrappers: list[QATWrapper],
            scale_dtype: Callable[[QATWrapper], str] | str = "float32") -> dict[str, Any]:
    """Replace every wrapper by its packed integer module (in place).

    Returns:
        Per layer name ``{"mode", "bits", "act", "weight_bytes", "fp32_weight_bytes"}``.
    """
    from netpress.nn.qat import PACKED_CLASSES  # netpress.nn imports this package

    out: dict[str, Any] = {}
    for w in wrappers:
        layer = w.layer
        q, s = w.wq.codes_and_scale(layer.weight)
        mode = {"binaryconnect": "binary"}.get(w.wq.mode, w.wq.mode)
        bits = {"binary": 1, "ternary": 2}.get(mode, w.wq.bits)
        act: dict[str, Any] = {"act_mode": None}
        if w.aq is not None:
            a_s, a_z = w.aq.qparams()
            act = {"act_mode": w.aq.mode, "act_bits": w.aq.bits, "act_scale": a_s,
                   "act_zero_point": a_z}
        sd = scale_dtype(w) if callable(scale_dtype) else scale_dtype
        cls = PACKED_CLASSES[type(layer)]
        packed = cls.from_codes(q, s, layer.bias, None if cls.__name__ == "PackedLinear" else layer,
                                bits=bits, weight_mode=mode, scale_dtype=sd, **act)
        packed = packed.to(layer.weight.device)
        _set_submodule(model, w.name, packed)
        out[w.name] = {"mode": w.wq.mode, "bits": bits, "act": act["act_mode"] and (
            f"{act['act_mode']}{w.aq.bits if act['act_mode'] == 'int' else ''}"),
            "weight_bytes": packed.weight_bytes(),
            "fp32_weight_bytes": layer.weight.numel() * 4}
    return out


def size_summary(layers: dict[str, Any]) -> dict[str, Any]:
    """Total packed vs fp32 weight bytes of the converted layers."""
    packed = sum(v["weight_bytes"] for v in layers.values())
    fp32 = sum(v["fp32_weight_bytes"] for v in layers.values())
    return {"weight_bytes": packed, "fp32_weight_bytes": fp32,
            "weight_ratio": round(fp32 / max(packed, 1), 3)}


# ------------------------------------------------------------------------------------ handler
@register("quantize", "qat", QATConfig,
          summary="quantization-aware training (STE, optional LSQ), then packed integer layers")
def quantize_qat(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Fold BN, fake-quantize, fine-tune, convert to packed integer layers (in place).

    Args:
        model: the model (modified and returned).
        config: a :class:`QATConfig`.
        ctx: ``ctx.data`` calibrates activation ranges; ``ctx.advanced["train"]`` (else
            ``ctx.data``) fine-tunes. ``ctx.report["qat"]`` gets the layers, bits and bytes.

    Returns:
        The model with ``PackedLinear`` / ``PackedConv1d`` / ``PackedConv2d`` layers.

    Raises:
        RecipeError: nothing to quantize. ModelError: NaN/Inf weights or an unsupported layer
        named in ``targets``. DataError: missing data or NaN/Inf activations.

    Example:
        >>> import torch, torch.nn as nn
        >>> ctx = StageContext(data=[Batch((torch.randn(8, 4),), torch.zeros(8).long())])
        >>> m = quantize_qat(nn.Sequential(nn.Linear(4, 2)), QATConfig(), ctx)
        >>> ctx.report["qat"]["layers"]["0"]["bits"]
        4
    """
    assert isinstance(config, QATConfig)
    teacher = qat_teacher(model, config.distill, ctx)
    folded = fold_batchnorm(model) if config.fold_bn else []
    layers, kept = select_layers(model, config.targets, config.ignore, "qat")
    act = None if config.activations is None else {
        "mode": "int", "bits": config.activations.bits, "learn_scale": config.learn_scale}
    wbits = weight_bits(config.weights.bits, config.weights.overflow_fix)
    plan = {name: {"mode": "int", "bits": wbits, "learn_scale": config.learn_scale,
                   "per_channel": config.weights.granularity == "per_channel", "act": act}
            for name, _ in layers}
    wrappers = prepare(model, layers, plan)
    calibrate(model, wrappers, list(ctx.data or []))
    log = train(model, train_batches(ctx), config.finetune, teacher, config.distill)
    converted = convert(model, wrappers)
    ctx.report["qat"] = {"weights_bits": wbits, "overflow_fix": overflow_note(
                             config.weights.bits, config.weights.overflow_fix), "granularity":
                         config.weights.granularity, "activations_bits":
                         None if config.activations is None else config.activations.bits,
                         "learn_scale": config.learn_scale, "folded_bn": folded,
                         "layers": converted, "kept_float": kept, "finetune": log,
                         "distill": None if config.distill is None else config.distill.model_dump(),
                         **size_summary(converted),
                         "execution": "ONNX QDQ: int8 weight codes (unpacked from packed "
                         f"{wbits}-bit storage) and uint8 activations"}
    return model.eval()


__all__ = ["QATActivations", "QATConfig", "QATDistill", "QATWeights", "calibrate", "convert",
           "prepare", "qat_teacher", "quantize_qat", "select_layers", "size_summary", "train",
           "train_batches"]
