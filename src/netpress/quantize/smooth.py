"""SmoothQuant-style static W8A8 for transformers: ``quantize: {method: smoothquant, alpha: 0.8}``.

Transformer activations have a few input channels with outliers 10-100x larger than the rest, so one
per-tensor int8 scale for a Linear's input wastes most of its codes. SmoothQuant (Xiao et al. 2023)
divides each input channel ``j`` by ``s_j = max|x_j|^α / max|W_{:,j}|^(1-α)`` and multiplies the
weight's column ``j`` by the same ``s_j``: the product is unchanged in float, the activation becomes
easy to quantize per tensor and the weight, quantized per output channel, absorbs the outliers.

Steps (netpress computes every factor, scale and zero point itself):

1. **Calibration, pass 1** (torch, forward pre-hooks): per-channel ``max|x|`` of every targeted
   ``nn.Linear``'s input; Linears that read the same tensor (Q/K/V of one attention block) form a
   group and share one smoothing vector (taking the max of their weights' ``|W|`` per column), so
   the deployed graph quantizes that tensor once.
2. **Calibration, pass 2**: an observer (``minmax`` default, ``mse``, ``percentile``) on ``x / s``
   gives the per-tensor uint8 ``(scale, zero_point)``.
3. **Swap**: each Linear becomes :class:`netpress.nn.smooth.SmoothQuantLinear` (int8 codes of
   ``W · diag(s)``, per-output-channel scales, the input quantizer and ``s``).
4. **Execution**: :func:`export_smoothquant_onnx` writes ``Mul(1/s) -> QuantizeLinear ->
   DequantizeLinear -> MatMul`` with int8 weights behind ``DequantizeLinear``; OpenVINO runs it
   on int8 kernels (ONNX Runtime as QDQ too). Attention's ``Q·Kᵀ`` and ``P·V`` stay float: on
   all-MiniLM-L6-v2 quantizing them cost cosine and was not faster on OpenVINO at sequence ~60.

Measured on all-MiniLM-L6-v2 (OpenVINO, 128 calibration sentences, 573 held-out; per-group
cosine to fp32 with only that group quantized): Q/K/V 0.9987 plain -> 0.9998 at α 0.7; FFN-in
0.9976 -> 0.9997 (α 0.7); FFN-out (after GELU) 0.9970 -> 0.9989 (α 0.8), 0.9902 at α 0.5 —
hence the default α 0.8 (the bench has the full-model figures).

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.api import quantize
    >>> from netpress.core.data import Batch
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    >>> q = quantize(net, {"method": "smoothquant"}, data=[Batch((torch.randn(64, 16),))])
    >>> [type(m).__name__ for m in q]
    ['SmoothQuantLinear', 'GELU', 'SmoothQuantLinear']
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.data import Batch, take_examples
from netpress.core.errors import DataError, ModelError, RecipeError
from netpress.core.targeting import select
from netpress.nn.smooth import SmoothQuantLinear
from netpress.quantize.overflow import OverflowFix, overflow_note, weight_qmax
from netpress.quantize.qscheme import check_finite


class SmoothWeights(BaseModel):
    """``weights:`` of ``smoothquant``: int8, symmetric, per output channel (fixed).

    Attributes:
        overflow_fix: ``auto`` / ``on`` / ``off``: 7-bit codes where int8 kernels saturate
            (:mod:`netpress.quantize.overflow`).
    """

    model_config = ConfigDict(extra="forbid")
    bits: Literal[8] = 8
    granularity: Literal["per_channel"] = "per_channel"
    overflow_fix: OverflowFix = "auto"


class SmoothActivations(BaseModel):
    """``activations:`` of ``smoothquant``: uint8 per tensor after smoothing.

    Attributes:
        bits: 8 (the integer kernels' width).
        observer: ``minmax`` (default), ``mse`` or ``percentile``.
        percentile: for ``observer: percentile``.
    """

    model_config = ConfigDict(extra="forbid")
    bits: Literal[8] = 8
    observer: Literal["minmax", "mse", "percentile"] = "minmax"
    percentile: float = Field(default=99.99, gt=50.0, le=100.0)


class SmoothQuantConfig(TechniqueConfig):
    """Config of ``quantize: {method: smoothquant}`` (see the module doc).

    Attributes:
        alpha: migration strength 0..1 (0: no smoothing, plain W8A8; 1: all onto the weights).
        weights / activations: see :class:`SmoothWeights`, :class:`SmoothActivations`.
        targets / ignore: module patterns (default targets: every ``nn.Linear``).
        calibration_examples: examples used for calibration (default 256).
    """

    method: Literal["smoothquant"] = "smoothquant"
    alpha: float = Field(default=0.8, ge=0.0, le=1.0)
    weights: SmoothWeights = Field(default_factory=SmoothWeights)
    activations: SmoothActivations = Field(default_factory=SmoothActivations)
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)
    calibration_examples: int = Field(default=256, ge=1, le=1_000_000)


def _batches(ctx: StageContext, limit: int) -> list[Batch]:
    data = list(ctx.data or [])
    if not data:
        raise DataError("smoothquant calibration data",
                        got="no batches" if ctx.data is not None else None,
                        expected="at least one calibration batch",
                        fix="give the recipe `data:` (e.g. zoo:sentences) or pass data= to quantize()")
    out = take_examples(data, limit)
    if sum(b.size for b in out) == 0:
        raise DataError("smoothquant calibration data", got="0 examples", expected="at least one",
                        fix="pass non-empty calibration batches")
    return out


def _run_hooks(model: nn.Module, layers: dict[str, nn.Linear], batches: list[Batch],
               fn: Any) -> None:
    """Call ``fn(name, x2d, x)`` with every targeted layer's input on every batch."""
    handles = [m.register_forward_pre_hook(
        lambda mod, args, name=name: fn(name, args[0].detach().reshape(-1, args[0].shape[-1]),
                                        args[0])) for name, m in layers.items()]
    try:
        with torch.inference_mode():
            for b in batches:
                b.run(model)
    finally:
        for h in handles:
            h.remove()


def smoothing_factors(xmax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|x_j|^α / max|W_j|^(1-α)`` clamped to ``[1e-5, 1e5]``; 1 where a side is 0.

    Example:
        >>> smoothing_factors(torch.tensor([100.0, 1.0]), torch.tensor([1.0, 1.0]), 0.5)
        tensor([10.,  1.])
    """
    live = (xmax > 0) & (wmax > 0)
    s = xmax.clamp(min=1e-8).pow(alpha) / wmax.clamp(min=1e-8).pow(1 - alpha)
    return torch.where(live, s.clamp(1e-5, 1e5), torch.ones_like(s))


@register("quantize", "smoothquant", SmoothQuantConfig,
          summary="static W8A8 for transformers: SmoothQuant per-channel scaling, calibrated "
          "per-tensor activations, int8 QDQ on OpenVINO / ONNX Runtime")
def quantize_smoothquant(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Smooth and quantize the targeted Linear layers in place (see the module doc).

    Args:
        model: the float model (a copy the caller owns).
        config: :class:`SmoothQuantConfig`.
        ctx: ``ctx.data`` holds the calibration batches; ``ctx.report["smoothquant"]`` is filled.

    Returns:
        The model with :class:`SmoothQuantLinear` layers.

    Raises:
        DataError: no calibration data, or NaN/Inf in a layer's input (the layer is named).
        ModelError: NaN/Inf in a weight. RecipeError: no Linear selected.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4)).eval()
        >>> ctx = StageContext(data=[Batch((torch.randn(8, 4),))])
        >>> _ = quantize_smoothquant(net, SmoothQuantConfig(alpha=0.5), ctx)
        >>> ctx.report["smoothquant"]["quantized"]
        ['0']
    """
    from netpress.quantize.observers import make_observer, range_to_qparams

    assert isinstance(config, SmoothQuantConfig)
    t0 = time.perf_counter()
    batches = _batches(ctx, config.calibration_examples)
    model.eval()
    chosen = select(model, config.targets, config.ignore, default=(nn.Linear,),
                    where="quantize.targets")
    kept = {n: f"{type(m).__name__} is not an nn.Linear" for n, m in chosen if type(m) is not nn.Linear}
    layers: dict[str, nn.Linear] = {n: m for n, m in chosen if type(m) is nn.Linear}
    if not layers:
        raise RecipeError("quantize.targets", got=config.targets or "the default (Linear)",
                          expected="at least one nn.Linear to quantize",
                          fix="check `targets` / `ignore` (`netpress inspect` lists names)")
    for name, m in layers.items():
        check_finite(m.weight, f"smoothquant layer {name} (weight)")
    # ---- pass 1: per-channel max|x| and the groups of layers that read the same tensor --------
    xmax: dict[str, torch.Tensor] = {}
    group_of: dict[str, int] = {}
    last: list[Any] = [None, -1]  # the previous layer's input tensor (held: no address reuse)

    def observe_max(name: str, x2: torch.Tensor, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x2).all()):
            raise DataError(f"smoothquant layer {name} (input)", got="NaN/Inf activations",
                            expected="finite calibration activations",
                            fix="check the calibration data and the model's earlier layers")
        a = x2.abs().amax(0).float()
        xmax[name] = torch.maximum(xmax[name], a) if name in xmax else a
        if name not in group_of:  # consecutive layers reading the same tensor share a group
            group_of[name] = last[1] if x is last[0] else len(group_of)
            last[0], last[1] = x, group_of[name]

    _run_hooks(model, layers, batches, observe_max)
    last.clear()
    for name in list(layers):
        if name not in xmax:
            kept[name] = "not reached by the calibration forward pass"
            layers.pop(name)
    if not layers:
        raise DataError("smoothquant calibration", got="no targeted Linear ran",
                        expected="the calibration batches to reach the targeted layers",
                        fix="check that the data matches the model's inputs")
    groups: dict[int, list[str]] = {}
    for name in layers:
        groups.setdefault(group_of[name], []).append(name)
    smooth: dict[str, torch.Tensor] = {}
    for members in groups.values():
        x_m = torch.stack([xmax[n] for n in members]).amax(0)
        w_m = torch.stack([layers[n].weight.detach().abs().amax(0).float() for n in members]).amax(0)
        s = smoothing_factors(x_m, w_m, config.alpha)
        for n in members:
            smooth[n] = s
    # ---- pass 2: per-tensor quantizer of x / s --------------------------------------------------
    a = config.activations
    opts = {"percentile": a.percentile} if a.observer == "percentile" else {}
    leader = {n: members[0] for members in groups.values() for n in members}
    observers = {n: make_observer(a.observer, bits=8, symmetric=False, where=f"{n} (input)", **opts)
                 for n in set(leader.values())}

    def observe_smoothed(name: str, x2: torch.Tensor, x: torch.Tensor) -> None:
        if name in observers:
            observers[name].update(x2.float() / smooth[name])

    _run_hooks(model, layers, batches, observe_smoothed)
    qparams = {}
    for n, obs in observers.items():
        lo, hi = obs.range()
        scale, zp = range_to_qparams(torch.as_tensor(lo), torch.as_tensor(hi), 8, False, False)
        qparams[n] = (float(scale), int(zp))
    qmax = weight_qmax(config.weights.bits, config.weights.overflow_fix)
    for name, m in layers.items():
        scale, zp = qparams[leader[name]]
        q = SmoothQuantLinear.from_float(m, smooth[name], scale, zp, qmax=qmax)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    ctx.report["smoothquant"] = {
        "alpha": config.alpha, "observer": a.observer, "quantized": sorted(layers),
        "kept_float": kept, "groups": [members for members in groups.values() if len(members) > 1],
        "calibration_examples": sum(b.size for b in batches),
        "max_smoothing": round(max(float(s.max()) for s in smooth.values()), 3),
        "seconds": round(time.perf_counter() - t0, 2),
        "overflow_fix": overflow_note(config.weights.bits, config.weights.overflow_fix),
        "execution": "int8 QDQ graph (export_smoothquant_onnx): OpenVINO / ONNX Runtime integer "
                     "MatMul; torch: float emulation of the integer product",
    }
    return model


# ---------------------------------------------------------------------------------------------
# ONNX emission
# ---------------------------------------------------------------------------------------------


def _find_nodes(graph: Any, qmods: dict[str, SmoothQuantLinear]) -> dict[str, tuple[Any, bool]]:
    """Module name -> (its MatMul/Gemm node, weight stored transposed), matched by the weight's
    exact values (the TorchScript exporter renames MatMul weights ``onnx::MatMul_N``)."""
    from onnx import numpy_helper

    want: dict[tuple[tuple[int, ...], bytes], tuple[str, bool]] = {}
    for name, m in qmods.items():
        w = m.smoothed_weight().numpy()
        want[(w.T.shape, np.ascontiguousarray(w.T).tobytes())] = (name, True)
        want.setdefault((w.shape, w.tobytes()), (name, False))
    inits = {i.name: i for i in graph.initializer}
    found: dict[str, tuple[Any, bool]] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        arr = numpy_helper.to_array(inits[node.input[1]])
        hit = want.get((arr.shape, np.ascontiguousarray(arr).tobytes()))
        if hit is None:
            continue
        name, transposed = hit
        if node.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            if trans_b == transposed:  # Gemm with transB reads (O, K); without, (K, O)
                continue
        found.setdefault(name, (node, transposed))
    return found


def _same_quantizer(a: SmoothQuantLinear, b: SmoothQuantLinear) -> bool:
    return (torch.equal(a.smooth, b.smooth) and float(a.input_scale) == float(b.input_scale)
            and int(a.input_zero_point) == int(b.input_zero_point))


def export_smoothquant_onnx(model: nn.Module, example: Batch, path: Any) -> dict[str, Any]:
    """Export a model holding :class:`SmoothQuantLinear` layers as an int8 QDQ ONNX file.

    The float twin (each layer as an ``nn.Linear`` holding the dequantized ``W · diag(s)``) is
    exported, then for each layer's input tensor ``t``: ``Mul(t, 1/s) -> QuantizeLinear ->
    DequantizeLinear`` feeds the layer's MatMul (only those: a residual branch reading ``t``
    keeps the float value), and the weight initializer becomes int8 codes behind a per-channel
    ``DequantizeLinear``.

    Args:
        model: a model after ``quantize: {method: smoothquant}``.
        example: one input batch (batch and sequence axes stay dynamic).
        path: the ``.onnx`` file to write.

    Returns:
        ``{"path", "integer": [layer names], "float": [layer names not found in the graph]}``.

    Raises:
        ModelError: the model holds no SmoothQuantLinear.

    Example:
        >>> import pathlib
        >>> from netpress.api import quantize
        >>> net = nn.Sequential(nn.Linear(8, 4)).eval()
        >>> q = quantize(net, {"method": "smoothquant"}, data=[Batch((torch.randn(16, 8),))])
        >>> with tempfile.TemporaryDirectory() as d:
        ...     export_smoothquant_onnx(q, Batch((torch.randn(1, 8),)), pathlib.Path(d, "q.onnx"))["integer"]
        ['0']
    """
    import onnx
    from onnx import helper, numpy_helper

    from netpress.export.onnx import export_onnx

    qmods = {n: m for n, m in model.named_modules() if isinstance(m, SmoothQuantLinear)}
    if not qmods:
        raise ModelError("export_smoothquant_onnx", got="no SmoothQuantLinear layer",
                         expected="a model after quantize: {method: smoothquant}",
                         fix="quantize the model first, or use netpress.export.onnx.export_onnx")
    twin = copy.deepcopy(model)
    for name in qmods:
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, qmods[name].to_float())
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = onnx.load(str(export_onnx(twin.eval(), example, Path(tmp, "fp32.onnx"))))
    graph = fp32.graph
    found = _find_nodes(graph, qmods)
    inits = {i.name: i for i in graph.initializer}
    head: list[Any] = []
    new_inits: list[Any] = []
    act_nodes: dict[str, list[Any]] = {}
    act_owner: dict[str, list[str]] = {}
    for name, (node, transposed) in found.items():
        m = qmods[name]
        t = node.input[0]
        tag = name.replace(".", "_")
        owner = next((o for o in act_owner.get(t, []) if _same_quantizer(qmods[o], m)), None)
        if owner is None:
            owner = name
            act_owner.setdefault(t, []).append(name)
            inv = (1.0 / m.smooth.double()).float().numpy()
            new_inits += [numpy_helper.from_array(inv, f"{tag}_inv_smooth"),
                          numpy_helper.from_array(np.array(float(m.input_scale), np.float32),
                                                  f"{tag}_in_scale"),
                          numpy_helper.from_array(np.array(int(m.input_zero_point), np.uint8),
                                                  f"{tag}_in_zp")]
            act_nodes.setdefault(t, []).extend([
                helper.make_node("Mul", [t, f"{tag}_inv_smooth"], [f"{tag}_smoothed"],
                                 name=f"{tag}_Smooth"),
                helper.make_node("QuantizeLinear", [f"{tag}_smoothed", f"{tag}_in_scale",
                                                    f"{tag}_in_zp"], [f"{tag}_q"],
                                 name=f"{tag}_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_in_scale",
                                                      f"{tag}_in_zp"], [f"{tag}_dq"],
                                 name=f"{tag}_DequantizeLinear")])
        node.input[0] = f"{owner.replace('.', '_')}_dq"
        w = node.input[1]
        graph.initializer.remove(inits.pop(w))
        codes = m.qweight.numpy()
        codes, axis = (np.ascontiguousarray(codes.T), 1) if transposed else (codes, 0)
        scale = m.weight_scale.numpy().astype(np.float32)
        new_inits += [numpy_helper.from_array(codes.astype(np.int8), f"{tag}_w_q"),
                      numpy_helper.from_array(scale, f"{tag}_w_scale"),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{tag}_w_zp")]
        head.append(helper.make_node("DequantizeLinear", [f"{tag}_w_q", f"{tag}_w_scale",
                                                          f"{tag}_w_zp"], [w], axis=axis,
                                     name=f"{tag}_w_DequantizeLinear"))
    ordered = list(head)
    for inp in graph.input:
        ordered += act_nodes.pop(inp.name, [])
    for node in list(graph.node):
        ordered.append(node)
        for o in node.output:
            ordered += act_nodes.pop(o, [])
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_inits)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(fp32, str(path))
    return {"path": str(path), "integer": sorted(found),
            "float": sorted(set(qmods) - set(found))}


__all__ = ["SmoothActivations", "SmoothQuantConfig", "SmoothWeights", "export_smoothquant_onnx",
           "quantize_smoothquant", "smoothing_factors"]
