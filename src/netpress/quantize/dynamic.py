"""Dynamic int8 quantization (SPEC Q4): int8 weights offline, activations quantized on the fly.

``quantize: {method: dynamic, weights: {bits: 8, granularity: per_channel}}``

Every targeted ``nn.Linear`` becomes a :class:`netpress.nn.lowbit.DynamicQuantLinear`: symmetric int8
weight codes with one scale per output channel (or per tensor). No calibration data is needed. Only
the Linear layers are quantized; attention's activation-by-activation products (``Q·Kᵀ``, ``P·V``)
stay float, which is what keeps the embedding cosine high (ONNX Runtime's ``quantize_dynamic``
quantizes those too, and per tensor).

Execution: :func:`export_dynamic` writes an ONNX file whose quantized layers run ONNX Runtime's
integer ``com.microsoft::DynamicQuantizeMatMul`` (uint8 activations x int8 weights, int32
accumulation, per-column weight scales) on the layer's own codes; ``runtime="openvino"`` instead
writes ``DequantizeLinear`` on the int8 weights, which OpenVINO compiles to its compressed-weight
FullyConnected with dynamic activation quantization. The torch module emulates the same integer
arithmetic in float.

Example:
    >>> import torch.nn as nn
    >>> from netpress.api import quantize
    >>> q = quantize(nn.Sequential(nn.Linear(16, 16), nn.ReLU()), {"method": "dynamic"})
    >>> type(q[0]).__name__, q[0].qweight.dtype
    ('DynamicQuantLinear', torch.int8)
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.errors import RecipeError
from netpress.core.targeting import select
from netpress.quantize.qscheme import check_finite
from netpress.quantize.weight_only import _set_submodule, rewrite_linears_onnx


class DynamicWeights(BaseModel):
    """``weights:`` of ``dynamic``: 8 bits (the integer kernels' width), per channel or per tensor."""

    model_config = ConfigDict(extra="forbid")
    bits: Literal[8] = 8
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"


class DynamicConfig(TechniqueConfig):
    """Config of ``dynamic``.

    Attributes:
        weights: ``{bits: 8, granularity: per_channel | per_tensor}``.
        targets: module patterns to quantize (default: every ``nn.Linear``).
        ignore: module patterns kept in float.
    """

    method: Literal["dynamic"] = "dynamic"
    weights: DynamicWeights = Field(default_factory=DynamicWeights)
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)


@register("quantize", "dynamic", DynamicConfig,
          summary="dynamic int8: int8 Linear weights, activations quantized on the fly "
          "(ORT DynamicQuantizeMatMul)")
def quantize_dynamic(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Replace the targeted Linear layers (in place) by :class:`DynamicQuantLinear`.

    Args:
        model: the model (modified and returned).
        config: a :class:`DynamicConfig`.
        ctx: the stage context (no data needed); ``ctx.report["dynamic"]`` is filled.

    Returns:
        ``model`` with ``DynamicQuantLinear`` layers.

    Raises:
        RecipeError: no Linear selected. ModelError: NaN/Inf in a weight (the layer is named).

    Example:
        >>> import torch.nn as nn
        >>> ctx = StageContext()
        >>> m = quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), DynamicConfig(), ctx)
        >>> ctx.report["dynamic"]["quantized"]
        ['0']
    """
    from netpress.nn.lowbit import DynamicQuantLinear

    assert isinstance(config, DynamicConfig)
    chosen = select(model, config.targets, config.ignore, default=(nn.Linear,),
                    where="quantize.targets")
    done: list[str] = []
    kept = [{"name": n, "reason": f"{type(m).__name__} is not an nn.Linear"}
            for n, m in chosen if type(m) is not nn.Linear]
    for name, module in chosen:
        if type(module) is not nn.Linear:
            continue
        check_finite(module.weight, f"quantize layer {name} (weight)")
        _set_submodule(model, name, DynamicQuantLinear.from_float(module, config.weights.granularity))
        done.append(name)
    if not done:
        raise RecipeError("quantize.targets", got=config.targets or "the default (Linear)",
                          expected="at least one nn.Linear to quantize",
                          fix="check `targets` / `ignore` (`netpress inspect` lists names)")
    ctx.report["dynamic"] = {
        "granularity": config.weights.granularity, "quantized": done, "kept_float": kept,
        "execution": "onnxruntime DynamicQuantizeMatMul (u8 x s8 integer kernel) after "
                     "export_dynamic; openvino: int8 compressed weights with dynamic activation "
                     "quantization; torch: float emulation of the integer product",
    }
    return model


def export_dynamic(model: nn.Module, example: Any, path: Any, runtime: str = "onnxruntime"
                   ) -> dict[str, Any]:
    """Export a model holding ``DynamicQuantLinear`` layers with integer weights in the ONNX file.

    Args:
        model: the quantized model.
        example: an example :class:`~netpress.core.data.Batch`.
        path: the ``.onnx`` file to write.
        runtime: ``"onnxruntime"`` (``DynamicQuantizeMatMul``, an integer kernel) or
            ``"openvino"`` (``DequantizeLinear`` on int8 weights, standard ONNX, which OpenVINO runs
            as compressed int8 weights with dynamic activation quantization).

    Returns:
        ``{"path", "integer": [layer names], "float": [layer names]}``.

    Raises:
        RecipeError: an unknown runtime. ModelError: the export fails.

    Example:
        >>> import tempfile, pathlib, torch, torch.nn as nn
        >>> from netpress.api import quantize
        >>> from netpress.core.data import Batch
        >>> q = quantize(nn.Sequential(nn.Linear(8, 4)), {"method": "dynamic"})
        >>> with tempfile.TemporaryDirectory() as d:
        ...     export_dynamic(q, Batch((torch.randn(1, 8),)), pathlib.Path(d, "m.onnx"))["integer"]
        ['0']
    """
    import numpy as np
    from onnx import helper, numpy_helper

    from netpress.nn.lowbit import DynamicQuantLinear

    if runtime not in ("onnxruntime", "openvino"):
        raise RecipeError("export_dynamic runtime", got=runtime,
                          expected="onnxruntime or openvino", fix="pick one of the two")

    def build(layer: Any, a: str, out: str, tag: str, graph: Any) -> list[Any]:
        n = layer.out_features
        codes = np.ascontiguousarray(layer.qweight.numpy().T)  # (K, N) int8
        scale = np.broadcast_to(layer.weight_scale.numpy().astype(np.float32), (n,)).copy()
        graph.initializer.extend([numpy_helper.from_array(codes, f"{tag}_B"),
                                  numpy_helper.from_array(scale, f"{tag}_scale"),
                                  numpy_helper.from_array(np.zeros(n, np.int8), f"{tag}_zp")])
        if runtime == "onnxruntime":
            return [helper.make_node("DynamicQuantizeMatMul",
                                     [a, f"{tag}_B", f"{tag}_scale", f"{tag}_zp"], [out],
                                     domain="com.microsoft")]
        return [helper.make_node("DequantizeLinear", [f"{tag}_B", f"{tag}_scale", f"{tag}_zp"],
                                 [f"{tag}_w"], axis=1),
                helper.make_node("MatMul", [a, f"{tag}_w"], [out])]

    done, left = rewrite_linears_onnx(model, example, path, (DynamicQuantLinear,), build)
    return {"path": str(path), "integer": done, "float": left}


__all__ = ["DynamicConfig", "DynamicWeights", "export_dynamic", "quantize_dynamic"]
