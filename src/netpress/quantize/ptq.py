"""Static post-training quantization W8A8 (SPEC Q3): ``quantize: {method: ptq, ...}``.

Recipe spelling::

    quantize: {method: ptq, weights: {bits: 8, granularity: per_channel},
               activations: {bits: 8, observer: percentile}}

Steps (all scales and zero points are computed here, by netpress's observers):

1. **BN folding** (:mod:`netpress.quantize.fold`): every ``Conv -> BatchNorm`` becomes one conv.
2. **Graph**: the folded float model is exported to ONNX once; each targeted ``Conv2d`` /
   ``Linear`` is found in the graph by its weight initializer. The tensors to quantize are the
   input of every such layer and (``quantize_residual_adds``) the output of a layer that feeds an
   ``Add``, so the residual Add stays in int8 on OpenVINO.
3. **Calibration**: the fp32 graph runs in ONNX Runtime on the calibration batches (256 examples
   by default) and one observer per tensor (Q2: minmax, moving_average, percentile, entropy, mse)
   turns the values into ``(scale, zero_point)``; non-negative tensors (ReLU/ReLU6 outputs) get
   uint8 codes with zero point 0, signed ones uint8 asymmetric (or int8 symmetric).
4. **Weights**: symmetric int8 per output channel (``minmax`` = max|w| / 127, ``mse``, or
   ``output_mse``: the scale that minimises the layer's output error on calibration inputs).
   ``per_tensor`` is honoured, but a layer in which some output channel's weight SQNR under one
   per-tensor scale falls below
   ``per_tensor_min_sqnr_db`` (BN-folded depthwise convs: the published MobileNetV2 collapse) is
   quantized per channel instead, with a warning and a report entry, unless
   ``per_tensor_fallback: false``.
5. **Swap**: each layer becomes a :class:`netpress.nn.ptq.W8A8Conv2d` / ``W8A8Linear`` (int8 codes,
   scales and activation quantizers as buffers; its forward simulates the integer arithmetic).
   :func:`netpress.quantize.qdq_onnx.export_qdq_onnx` writes the QDQ ONNX file that ONNX Runtime
   and OpenVINO run on integer kernels.

Accuracy options (opt-in): ``activations: {search: true}`` picks each layer input's range by
the layer-output error (:mod:`netpress.quantize.act_search`), ``rounding: adaround`` learns the
weight rounding layer by layer (:mod:`netpress.quantize.adaround`), ``rounding: brecq`` learns the
rounding of whole blocks jointly, with QDrop and learned activation step sizes
(:mod:`netpress.quantize.brecq`; options in ``brecq: {iters, qdrop, ...}``),
``bias_correction: true`` corrects biases
(:mod:`netpress.quantize.bias_correction`); all of them only change the int8 codes, scales and
biases that the QDQ file carries.

``ctx.report["ptq"]`` lists quantized layers, layers left in float with the reason, folded BNs,
fallbacks and the calibration size.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.api import quantize
    >>> from netpress.core.data import Batch
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
    ...                     nn.Linear(8 * 6 * 6, 4)).eval()
    >>> data = [Batch((torch.randn(16, 3, 8, 8),))]
    >>> q = quantize(net, {"method": "ptq"}, data=data)
    >>> [type(m).__name__ for m in q]
    ['W8A8Conv2d', 'Identity', 'ReLU', 'Flatten', 'W8A8Linear']
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, model_validator

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.data import Batch
from netpress.core.errors import DataError, RecipeError
from netpress.core.targeting import select
from netpress.nn.ptq import W8A8Conv2d, W8A8Linear
from netpress.quantize.fakequant import check_weight
from netpress.quantize.fold import fold_batchnorm
from netpress.quantize.observers import OBSERVERS, make_observer
from netpress.quantize.overflow import OverflowFix, overflow_note, weight_bits

if TYPE_CHECKING:
    import onnx

ObserverName = Literal["minmax", "moving_average", "percentile", "entropy", "mse"]
assert set(OBSERVERS) == set(ObserverName.__args__)  # type: ignore[attr-defined]


class PTQWeights(BaseModel):
    """Weight quantization of ``ptq``: symmetric int8 codes.

    Attributes:
        bits: 2..8 (codes stored in int8; 8 for W8A8 integer kernels).
        granularity: ``per_channel`` (default) or ``per_tensor``.
        observer: ``minmax`` (max|w|), ``mse`` (per-channel MSE-optimal clipping of the weights)
            or ``output_mse`` (per-channel scale minimising the layer-output error ``eᵀHe`` with
            ``H`` the second moment of the layer's float input on ``search_examples``
            calibration examples: :mod:`netpress.quantize.weight_search`).
        search_examples: calibration examples for ``output_mse``.
        overflow_fix: ``auto`` (7-bit codes for 8-bit weights where this CPU's int8 kernels
            saturate, i.e. x86-64 without VNNI), ``on`` or ``off``; see
            :mod:`netpress.quantize.overflow`.
    """

    model_config = ConfigDict(extra="forbid")
    bits: int = Field(default=8, ge=2, le=8)
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    observer: Literal["minmax", "mse", "output_mse"] = "minmax"
    search_examples: int = Field(default=128, ge=1, le=100_000)
    overflow_fix: OverflowFix = "auto"

    @model_validator(mode="after")
    def _check(self) -> PTQWeights:
        if self.observer == "output_mse" and self.granularity != "per_channel":
            raise ValueError("observer output_mse picks one scale per output channel: use "
                             "granularity: per_channel, or observer: minmax / mse for per_tensor")
        return self


class PTQActivations(BaseModel):
    """Activation quantization of ``ptq`` (per tensor).

    Attributes:
        bits: 2..8.
        observer: one of minmax, moving_average, percentile, entropy, mse.
        percentile: for ``observer: percentile``.
        symmetric: int8 symmetric codes for signed tensors (default: uint8 asymmetric).
        search: output-aware ranges (:mod:`netpress.quantize.act_search`): per layer input,
            the observer's range or the observed range shrunk by 1.0..0.3, whichever gives the
            smallest layer-output error on ``search_examples`` calibration examples.
    """

    model_config = ConfigDict(extra="forbid")
    bits: int = Field(default=8, ge=2, le=8)
    observer: ObserverName = "percentile"
    percentile: float = Field(default=99.99, gt=50.0, le=100.0)
    symmetric: bool = False
    search: bool = False
    search_examples: int = Field(default=32, ge=1, le=100_000)


class PTQAdaRound(BaseModel):
    """Options of ``rounding: adaround`` (:mod:`netpress.quantize.adaround`).

    Attributes:
        examples: calibration examples whose statistics drive the rounding.
        iters / lr / reg: Adam steps per layer, learning rate, rounding regulariser λ.
        positions: im2col rows (output positions) sampled per example and layer.
        correct_bias: centre the statistics and shift each bias by the output-mean error.
        asymmetric: reconstruct the float model's layer output (absorbing upstream error)
            rather than the layer's float weights on its quantized input.
    """

    model_config = ConfigDict(extra="forbid")
    examples: int = Field(default=256, ge=1, le=100_000)
    iters: int = Field(default=300, ge=1, le=100_000)
    lr: float = Field(default=1e-2, gt=0.0, le=1.0)
    reg: float = Field(default=0.01, ge=0.0)
    positions: int = Field(default=256, ge=1)
    correct_bias: bool = False
    asymmetric: bool = False


class PTQBrecq(BaseModel):
    """Options of ``rounding: brecq`` (:mod:`netpress.quantize.brecq`): block reconstruction.

    Attributes:
        examples: calibration examples reconstructed on.
        iters / batch / patch: Adam steps per block, examples per step, window side of larger
            feature maps.
        lr / act_lr: learning rates of the rounding variables and of the log step sizes.
        reg: rounding regulariser λ.
        qdrop: QDrop probability of bypassing each activation quantizer (0: plain BRECQ).
        learn_act: also learn the activation step sizes (LSQ-style).
        crop: reconstruct on one random ``crop x crop`` window of each calibration image
            (offsets multiples of 32; :func:`netpress.quantize.brecq.sub_crops`), which cuts the
            cost of propagating block inputs by ``(crop / side)²``; ``null``: whole images.
            MobileNetV2 (stop 12, torch integer simulation, 400 held-out crops, 2 threads,
            load ~1.5): ``examples: 256, crop: 96`` 0.8625 all / 0.9754 confident, PTQ 61 s
            (BRECQ 54 s); 128 whole crops 0.8775 / 0.9852, PTQ 150 s (BRECQ 131 s). The
            default stays ``null`` (accuracy first; ``crop: 96`` is the cheap setting).

    The defaults are sized for a shared 2-core CPU (MobileNetV2: 19 units, ~6 min at load ~25);
    the papers run ~20k steps of batch 32 per block.
    """

    model_config = ConfigDict(extra="forbid")
    examples: int = Field(default=128, ge=1, le=100_000)
    iters: int = Field(default=60, ge=1, le=100_000)
    batch: int = Field(default=8, ge=1, le=4096)
    patch: int = Field(default=16, ge=4, le=4096)
    lr: float = Field(default=1e-2, gt=0.0, le=1.0)
    act_lr: float = Field(default=1e-3, ge=0.0, le=1.0)
    reg: float = Field(default=0.01, ge=0.0)
    qdrop: float = Field(default=0.5, ge=0.0, lt=1.0)
    learn_act: bool = True
    crop: int | None = Field(default=None, ge=8, le=100_000)


class PTQConfig(TechniqueConfig):
    """Config of ``quantize: {method: ptq}`` (see the module doc).

    Attributes:
        weights / activations: see :class:`PTQWeights`, :class:`PTQActivations`.
        targets / ignore: module patterns (default targets: every Conv2d and Linear).
        fold_bn: fold Conv->BatchNorm pairs first (default true).
        quantize_residual_adds: quantize outputs of layers feeding an Add (default true).
        calibration_examples: examples used for calibration (default 256).
        per_tensor_fallback / per_tensor_min_sqnr_db: see the module doc, step 4.
        calibration_runtime: ``onnxruntime`` (the default: the exported fp32 graph with the
            observed tensors added as outputs) or ``torch`` (forward hooks on the float model).
            Both see the same float values; on MobileNetV2 with 256 crops, 2 threads, ORT took
            22.8 s CPU for the whole PTQ stage and torch hooks 37.3 s.
        bias_correction: empirical, sequential bias correction of every W8A8 conv after
            quantization (:mod:`netpress.quantize.bias_correction`) on the first
            ``bias_correction_examples`` calibration examples, run as one batch.
            ``bias_correction_mode``: ``weight_error`` (DFQ: the mean of the weight-rounding
            error on each layer's quantized input; MobileNetV2 logit MSE 0.18 -> 0.12 on
            held-out calibration crops) or ``output_mean`` (match the float per-channel output
            means; measured harmful on MobileNetV2: logit MSE 0.18 -> 1.31).
        rounding: ``nearest`` (default) or ``adaround``: learned up/down rounding of every
            weight code that minimises the layer's output reconstruction error on calibration
            inputs (:mod:`netpress.quantize.adaround`; options in ``adaround``). Runs before
            ``bias_correction``; its seconds are in the report (``adaround.seconds``).
            MobileNetV2, 400 held-out photo crops, torch integer simulation, 128 AdaRound
            examples: top-1 agreement 0.8375 -> 0.870 (confident crops 0.970 -> 0.975),
            0.8725 with ``bias_correction`` too; the target 0.93 is not reached.
            ``brecq``: block reconstruction (BRECQ) with QDrop (:mod:`netpress.quantize.brecq`,
            options in ``brecq``); slower (its seconds are in the report, ``brecq.seconds``).
            MobileNetV2 with the defaults (128 calibration crops, 60 steps of 8 per block),
            torch integer simulation, first 96 held-out crops: agreement 0.875 -> 0.917
            (confident 0.98 -> 0.98), 977 s at load ~25 on 2 shared cores, 1 thread.
    """

    method: Literal["ptq"] = "ptq"
    weights: PTQWeights = Field(default_factory=PTQWeights)
    activations: PTQActivations = Field(default_factory=PTQActivations)
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)
    fold_bn: bool = True
    quantize_residual_adds: bool = True
    calibration_examples: int = Field(default=256, ge=1, le=1_000_000)
    per_tensor_fallback: bool = True
    per_tensor_min_sqnr_db: float = 10.0
    calibration_runtime: Literal["torch", "onnxruntime"] = "onnxruntime"
    bias_correction: bool = False
    bias_correction_examples: int = Field(default=64, ge=1, le=4096)
    bias_correction_mode: Literal["weight_error", "output_mean"] = "weight_error"
    rounding: Literal["nearest", "adaround", "brecq"] = "nearest"
    adaround: PTQAdaRound = Field(default_factory=PTQAdaRound)
    brecq: PTQBrecq = Field(default_factory=PTQBrecq)


def _check_data(ctx: StageContext) -> list[Batch]:
    data = ctx.data
    if not data:
        raise DataError("ptq calibration data", got="no batches" if data is not None else None,
                        expected="at least one calibration batch",
                        fix="give the recipe `data:` (e.g. zoo:photos) or pass data= to quantize()")
    return list(data)


def _first_inputs(batches: list[Batch], n: int) -> torch.Tensor:
    """The first ``n`` examples' (single, positional) input tensor, concatenated."""
    xs, have = [], 0
    for b in batches:
        if have >= n:
            break
        if isinstance(b.inputs, dict) or len(b.inputs) != 1:
            raise DataError("ptq bias_correction data", got="multi-input batches",
                            expected="one positional input tensor per batch",
                            fix="set bias_correction: false for this model")
        xs.append(b.inputs[0][: n - have])
        have += len(xs[-1])
    return torch.cat(xs)


def _graph_layers(graph: onnx.GraphProto, modules: dict[str, nn.Module]) -> dict[str, onnx.NodeProto]:
    """Module name -> its Conv/Gemm/MatMul node, found by the weight initializer's name."""
    from netpress.quantize.qdq_onnx import LINEAR_OPS

    found: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        if node.op_type in LINEAR_OPS and len(node.input) >= 2:
            w = node.input[1]
            for prefix in ("model.", ""):
                name = w[len(prefix):-len(".weight")] if w.startswith(prefix) and w.endswith(
                    ".weight") else None
                if name in modules and name not in found:
                    found[name] = node
    return found


def calibrate_onnx(path: Path, tensors: dict[str, str], batches: list[Batch], observer: str,
                   bits: int, symmetric: bool, percentile: float,
                   limit: int) -> dict[str, Any]:
    """Run the fp32 graph in ONNX Runtime and observe ``tensors`` (name -> layer for errors).

    Returns:
        tensor name -> its fitted observer.

    Raises:
        DataError: NaN/Inf activations (naming the layer) or no examples.
    """
    import onnx

    from netpress.export.onnx import OnnxRunner

    model = onnx.load(str(path))
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(
                t, onnx.TensorProto.FLOAT, None))
    tmp = path.with_name("calibrate.onnx")
    onnx.save(model, str(tmp))
    runner = OnnxRunner(tmp, threads=torch.get_num_threads())
    names = [o.name for o in runner.session.get_outputs()]
    opts = {"percentile": percentile} if observer == "percentile" else {}
    observers = {t: make_observer(observer, bits=bits, symmetric=symmetric,
                                  where=f"{layer} (tensor {t})", **opts)
                 for t, layer in tensors.items()}
    seen = 0
    for batch in batches:
        if seen >= limit:
            break
        n = min(batch.size, limit - seen)
        b = batch.slice(n) if n < batch.size else batch
        outs = runner.session.run(names, runner.feeds(b))
        for name, value in zip(names, outs, strict=True):
            if name in observers:
                observers[name].update(torch.from_numpy(np.asarray(value)))
        seen += n
    if seen == 0:
        raise DataError("ptq calibration data", got="0 examples", expected="at least one",
                        fix="pass non-empty calibration batches")
    return observers


def calibrate_torch(model: nn.Module, inputs: dict[str, str], outputs: dict[str, str],
                    tensors: dict[str, str], batches: list[Batch], observer: str, bits: int,
                    symmetric: bool, percentile: float, limit: int) -> dict[str, Any]:
    """Observe activations of the float ``model`` with forward hooks (no ONNX run).

    Args:
        model: the float (BN-folded) model.
        inputs: module name -> the graph tensor name of its input (observed before the module).
        outputs: module name -> the graph tensor name of its output (observed after it).
        tensors: tensor name -> the layer description used in errors.
        batches, observer, bits, symmetric, percentile, limit: as :func:`calibrate_onnx`.

    Returns:
        tensor name -> its fitted observer (each tensor observed once, by its first reader).

    Raises:
        DataError: NaN/Inf activations (naming the layer) or no examples.
    """
    opts = {"percentile": percentile} if observer == "percentile" else {}
    observers = {t: make_observer(observer, bits=bits, symmetric=symmetric,
                                  where=f"{layer} (tensor {t})", **opts)
                 for t, layer in tensors.items()}
    owner_in: dict[str, str] = {}
    for name, t in inputs.items():
        owner_in.setdefault(t, name)
    modules = dict(model.named_modules())
    hooks = []
    for t, name in owner_in.items():
        hooks.append(modules[name].register_forward_pre_hook(
            lambda _m, args, t=t: observers[t].update(args[0])))
    for name, t in outputs.items():
        hooks.append(modules[name].register_forward_hook(
            lambda _m, _a, y, t=t: observers[t].update(y)))
    seen = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                if seen >= limit:
                    break
                n = min(batch.size, limit - seen)
                b = batch.slice(n) if n < batch.size else batch
                b.run(model)
                seen += n
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise DataError("ptq calibration data", got="0 examples", expected="at least one",
                        fix="pass non-empty calibration batches")
    return observers


def _act_qparams(obs: Any, symmetric: bool) -> tuple[float, int, bool]:
    scale, zp = obs.qparams()
    signed = bool(obs.is_signed())
    if not symmetric and signed:  # asymmetric signed data: uint8 codes with a zero point
        lo, hi = obs.range()
        from netpress.quantize.observers import range_to_qparams
        scale, zp = range_to_qparams(lo, hi, obs.bits, False, False)
        signed = False
    return float(scale), int(zp), signed


def _weight_scale(w: torch.Tensor, cfg: PTQWeights, per_channel: bool, where: str,
                  moments: torch.Tensor | None = None) -> torch.Tensor:
    qmax = (1 << (cfg.bits - 1)) - 1
    if moments is not None:  # output_mse (per_channel only: PTQWeights checks)
        from netpress.quantize.weight_search import output_aware_scales

        return output_aware_scales(w, moments, cfg.bits)
    if cfg.observer == "mse":
        obs = make_observer("mse", bits=cfg.bits, symmetric=True, signed=True, where=where,
                            axis=0 if per_channel else None)
        obs.update(w)
        return obs.qparams()[0]
    flat = w.detach().float().abs().reshape(w.shape[0], -1)  # (O, K)
    return (flat.amax(1) if per_channel else flat.amax()) / qmax


def per_tensor_sqnr(w: torch.Tensor, bits: int = 8) -> float:
    """Worst output channel's SQNR (dB) when the whole weight shares one per-tensor scale.

    All-zero (dead) channels are skipped. After BN folding, MobileNetV2's first conv and first
    depthwise conv have channels that round to zero under one scale (SQNR ~0 dB): the published
    per-tensor collapse.

    Example:
        >>> w = torch.ones(2, 4); w[1] *= 1000
        >>> round(per_tensor_sqnr(w), 1)
        0.0
    """
    qmax = (1 << (bits - 1)) - 1
    w = w.detach().float()
    s = w.abs().max() / qmax
    s = s if s > 0 else torch.tensor(1.0)
    err = torch.clamp(torch.round(w / s), -qmax, qmax) * s - w
    sig = (w * w).reshape(w.shape[0], -1).sum(1)  # (O,)
    noise = (err * err).reshape(w.shape[0], -1).sum(1).clamp(min=1e-30)
    live = sig > 0
    if not bool(live.any()):
        return float("inf")
    return float((10 * torch.log10(sig[live] / noise[live])).min())


def per_tensor_collapse(model: nn.Module, bits: int = 8, min_sqnr_db: float = 10.0) -> dict[str, float]:
    """Layers (Conv2d / Linear) whose worst channel falls below ``min_sqnr_db`` per tensor."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            sq = per_tensor_sqnr(m.weight, bits)
            if sq < min_sqnr_db:
                out[name] = round(sq, 2)
    return out


def _search_ranges(model: nn.Module, chosen: dict[str, nn.Module], nodes: dict[str, Any],
                   out_quant: dict[str, str], observers: dict[str, Any], batches: list[Batch],
                   a: PTQActivations) -> dict[str, tuple[float, int, bool]]:
    """``activations.search``: tensor -> the chosen ``(scale, zero_point, signed)``."""
    if not a.search:
        return {}
    from netpress.quantize.act_search import DEFAULT_ALPHAS, search_input_ranges
    from netpress.quantize.observers import range_to_qparams

    outs = set(out_quant.values())
    cands: dict[str, list[tuple[float, int]]] = {}
    signs: dict[str, bool] = {}
    inputs: dict[str, str] = {}
    for name in chosen:
        t = nodes[name].input[0]
        if t in outs or t in inputs.values():  # an Add-fed output, or a second reader
            continue
        obs = observers[t]
        s0, z0, sg = _act_qparams(obs, a.symmetric)
        lo, hi = float(obs.lo.min()), float(obs.hi.max())
        cl = [(s0, z0)]
        for al in DEFAULT_ALPHAS:
            sc, zp = range_to_qparams(torch.tensor(lo * al), torch.tensor(hi * al), a.bits,
                                      a.symmetric and sg, sg)
            cl.append((float(sc), int(zp)))
        cands[name], signs[name], inputs[name] = cl, sg, t
    best = search_input_ranges(model, inputs, cands, _first_inputs(batches, a.search_examples),
                               a.bits, signs)
    return {t: (sc, zp, signs[n]) for n, t in inputs.items() for sc, zp in [best[t]]}


@register("quantize", "ptq", PTQConfig,
          summary="static W8A8 PTQ: BN folding, calibrated activations, integer QDQ/OpenVINO")
def quantize_ptq(model: nn.Module, config: PTQConfig, ctx: StageContext) -> nn.Module:
    """Apply static W8A8 post-training quantization in place (see the module doc).

    Args:
        model: the float model (a copy the caller owns).
        config: :class:`PTQConfig`.
        ctx: ``ctx.data`` holds the calibration batches; ``ctx.report["ptq"]`` is filled.

    Returns:
        The model with W8A8 layers.

    Raises:
        DataError: no calibration data, or NaN/Inf activations (names the layer).
        ModelError: NaN/Inf in a targeted layer's weight (after BN folding; names the layer).
        RecipeError: bad bits / granularity / observer (from the config).
    """
    import onnx

    from netpress.export.onnx import export_onnx
    from netpress.quantize.qdq_onnx import consumers, producers

    t0 = time.perf_counter()
    batches = _check_data(ctx)
    model.eval()
    folded = fold_batchnorm(model) if config.fold_bn else []
    chosen = dict(select(model, config.targets, config.ignore, default=(nn.Conv2d, nn.Linear)))
    kept: dict[str, str] = {}
    for name, m in list(chosen.items()):
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            kept[name] = f"{type(m).__name__} has no W8A8 kernel here (Conv2d/Linear only)"
            chosen.pop(name)
        elif isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            kept[name] = f"padding_mode={m.padding_mode!r} (zero padding only)"
            chosen.pop(name)
        else:
            check_weight(m, name)  # NaN/Inf (also from a folded BatchNorm) named, never quantized
    if not chosen:
        raise RecipeError("quantize.targets", got=config.targets or "the default (Conv2d, Linear)",
                          expected="at least one nn.Conv2d / nn.Linear to quantize"
                          + (f" (kept float: {kept})" if kept else ""),
                          fix="check `targets` / `ignore` (`netpress inspect` lists names)")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, batches[0].slice(1), Path(tmp, "fp32.onnx"))
        graph = onnx.load(str(path)).graph
        nodes = _graph_layers(graph, chosen)
        for name in list(chosen):
            if name not in nodes:
                kept[name] = "not found as a Conv/Gemm/MatMul with its own weight in the graph"
                chosen.pop(name)
        users, makers = consumers(graph), producers(graph)
        tensors: dict[str, str] = {}
        out_quant: dict[str, str] = {}  # module -> its output tensor (feeds an Add)
        for name in chosen:
            node = nodes[name]
            tensors.setdefault(node.input[0], f"{name} input")
            if config.quantize_residual_adds and any(
                    u.op_type == "Add" for u in users.get(node.output[0], [])):
                out_quant[name] = node.output[0]
                tensors.setdefault(node.output[0], f"{name} output")
        del makers
        a = config.activations
        if config.calibration_runtime == "onnxruntime":
            observers = calibrate_onnx(path, tensors, batches, a.observer, a.bits, a.symmetric,
                                       a.percentile, config.calibration_examples)
        else:
            observers = calibrate_torch(model, {n: nodes[n].input[0] for n in chosen},
                                        out_quant, tensors, batches, a.observer, a.bits,
                                        a.symmetric, a.percentile, config.calibration_examples)
    override = _search_ranges(model, chosen, nodes, out_quant, observers, batches, a)
    keep_float = config.bias_correction or config.rounding in ("adaround", "brecq")
    float_model = copy.deepcopy(model) if keep_float else None
    fallbacks: dict[str, float] = {}
    per_channel_default = config.weights.granularity == "per_channel"
    wcfg = config.weights.model_copy(update={"bits": weight_bits(config.weights.bits,
                                                                 config.weights.overflow_fix)})
    qmax = (1 << (wcfg.bits - 1)) - 1
    moments: dict[str, torch.Tensor] = {}
    if wcfg.observer == "output_mse":
        from netpress.core.data import take_examples
        from netpress.quantize.weight_search import input_moments

        moments = input_moments(model, list(chosen), take_examples(batches, wcfg.search_examples))
    for name, m in chosen.items():
        node = nodes[name]
        per_channel = per_channel_default
        if not per_channel:
            sq = per_tensor_sqnr(m.weight, wcfg.bits)
            if sq < config.per_tensor_min_sqnr_db:
                if config.per_tensor_fallback:
                    fallbacks[name] = round(sq, 2)
                    per_channel = True
        s_in, z_in, signed_in = override.get(node.input[0]) or _act_qparams(
            observers[node.input[0]], a.symmetric)
        out_qp, out_signed = None, True
        if name in out_quant:
            s_o, z_o, out_signed = _act_qparams(observers[out_quant[name]], a.symmetric)
            out_qp = (s_o, z_o)
        ws = _weight_scale(m.weight, wcfg, per_channel, name, moments.get(name))
        cls = W8A8Conv2d if isinstance(m, nn.Conv2d) else W8A8Linear
        q = cls.from_float(m, s_in, z_in, act_bits=a.bits, act_signed=signed_in,  # type: ignore[arg-type]
                           per_channel=per_channel, output_qparams=out_qp,
                           out_signed=out_signed, weight_scale=ws)
        if wcfg.bits < 8:
            with torch.no_grad():
                q.qweight.clamp_(-qmax, qmax)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    shifts: dict[str, float] = {}
    ada: dict[str, Any] = {}
    if float_model is not None and config.rounding == "adaround":
        from netpress.quantize.adaround import adaround

        t_ada, o = time.perf_counter(), config.adaround
        layers = adaround(float_model, model, _first_inputs(batches, o.examples), sorted(chosen),
                          iters=o.iters, lr=o.lr, reg=o.reg, positions=o.positions,
                          correct_bias=o.correct_bias, asymmetric=o.asymmetric, qmax=qmax)
        ada = {"seconds": round(time.perf_counter() - t_ada, 2), "layers": layers}
    rec: dict[str, Any] = {}
    if float_model is not None and config.rounding == "brecq":
        from netpress.quantize.brecq import brecq

        t_rec, b = time.perf_counter(), config.brecq
        units = brecq(float_model, model, _first_inputs(batches, b.examples), sorted(chosen),
                      iters=b.iters, batch=b.batch, patch=b.patch, lr=b.lr, act_lr=b.act_lr,
                      reg=b.reg, qdrop=b.qdrop, learn_act=b.learn_act, crop=b.crop, qmax=qmax)
        rec = {"seconds": round(time.perf_counter() - t_rec, 2), "units": units}
    if float_model is not None and config.bias_correction:
        from netpress.quantize.bias_correction import bias_correct

        x = _first_inputs(batches, config.bias_correction_examples)
        shifts = bias_correct(float_model, model, x, mode=config.bias_correction_mode)
    if fallbacks:
        warnings.warn(f"ptq: per_tensor weights collapse on {len(fallbacks)} layers (weight SQNR "
                      f"below {config.per_tensor_min_sqnr_db} dB, e.g. "
                      f"{dict(list(fallbacks.items())[:3])}); they were quantized per_channel. "
                      "Set per_tensor_fallback: false to force per_tensor.", stacklevel=2)
    ctx.report["ptq"] = {
        "quantized": sorted(chosen), "kept_float": kept, "folded_bn": folded,
        "per_tensor_fallback": fallbacks, "quantized_outputs": sorted(out_quant),
        "observer": a.observer, "calibration_examples": min(
            config.calibration_examples, sum(b.size for b in batches)),
        "bias_correction": {k: round(v, 5) for k, v in shifts.items()},
        "calibration_runtime": config.calibration_runtime, "rounding": config.rounding,
        "adaround": ada, "brecq": rec, "searched_inputs": len(override),
        "seconds": round(time.perf_counter() - t0, 2),
        "execution": "integer kernels via the QDQ ONNX graph (ONNX Runtime / OpenVINO)",
        "weight_bits": wcfg.bits,
        "overflow_fix": overflow_note(config.weights.bits, config.weights.overflow_fix),
    }
    return model


__all__ = ["PTQActivations", "PTQAdaRound", "PTQBrecq", "PTQConfig", "PTQWeights", "calibrate_onnx",
           "per_tensor_collapse", "per_tensor_sqnr", "quantize_ptq"]
