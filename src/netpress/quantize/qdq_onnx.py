"""Write a QDQ ONNX model from an fp32 ONNX export plus netpress's own calibrated parameters.

netpress computes every scale and zero point itself (observers, :mod:`netpress.quantize.ptq`);
this module only rewrites the fp32 graph:

* a quantized weight initializer ``W`` becomes an int8 initializer ``W_quantized`` followed by
  ``DequantizeLinear(W_quantized, W_scale, axis)`` whose output keeps the name ``W`` (so the
  consuming ``Conv`` / ``Gemm`` / ``MatMul`` is unchanged);
* the bias of a ``Conv`` / ``Gemm`` whose input and weight are both quantized becomes int32 codes
  ``round(b / (s_x · s_w))`` with ``DequantizeLinear`` (scale ``s_x · s_w`` per channel), the form
  ONNX Runtime fuses into ``QLinearConv`` and OpenVINO into an integer convolution;
* a quantized activation tensor ``t`` gets ``QuantizeLinear -> DequantizeLinear`` once, and every
  consumer of ``t`` reads the dequantized tensor (so a residual ``Add`` whose inputs are both
  quantized stays in int8 on OpenVINO); codes of fewer than 8 bits get a ``Clip`` at their
  range in front (``QuantizeLinear`` itself saturates only at the 8-bit limits).

The skip branch of a residual ``Add`` therefore reads the quantized tensor, where the torch
simulation (:mod:`netpress.nn.ptq`) adds the float one: on the test CNN of ``tests/test_ptq.py``
the two differ by 0.3 % of the output in the calibrated range and by 10 % on inputs 4x outside it.

ONNX Runtime and OpenVINO turn these ``Q -> DQ -> op`` patterns into integer kernels.

Example:
    >>> import numpy as np, onnx
    >>> from onnx import helper, TensorProto, numpy_helper
    >>> w = numpy_helper.from_array(np.ones((2, 3), np.float32), "W")
    >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    >>> q = insert_qdq(m, {"W": QuantWeight(np.ones((2, 3), np.int8), np.ones(3, np.float32), 1)},
    ...                {"x": QuantAct(0.1, 128, False)})
    >>> [n.op_type for n in q.graph.node]
    ['DequantizeLinear', 'QuantizeLinear', 'DequantizeLinear', 'MatMul']
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch.nn as nn
from onnx import helper, numpy_helper

from netpress.core.data import Batch
from netpress.quantize.observers import code_range

LINEAR_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class QuantWeight:
    """Int8 codes of a weight initializer with their scale (``()`` or ``(C,)`` along ``axis``)."""

    codes: np.ndarray
    scale: np.ndarray
    axis: int = 0


@dataclass
class QuantAct:
    """Per-tensor activation quantizer: ``scale``, ``zero_point``, int8 (signed) or uint8, and the
    code width ``bits`` (2..8; below 8 the codes are held in 8-bit storage)."""

    scale: float
    zero_point: int
    signed: bool
    bits: int = 8

    def float_range(self) -> tuple[float, float]:
        """The float interval whose codes stay in the ``bits``-wide range."""
        lo, hi = code_range(self.bits, False, self.signed)
        return (lo - self.zero_point) * self.scale, (hi - self.zero_point) * self.scale


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {o: node for node in graph.node for o in node.output}


def insert_qdq(model: onnx.ModelProto, weights: dict[str, QuantWeight],
               acts: dict[str, QuantAct], quantize_bias: bool = True) -> onnx.ModelProto:
    """Return a copy of ``model`` with Q/DQ nodes for ``weights`` and ``acts``.

    Args:
        model: the fp32 ONNX model.
        weights: initializer name -> its int8 codes and scale.
        acts: tensor name -> its activation quantizer.
        quantize_bias: int32 biases for Conv/Gemm whose input and weight are both quantized.

    Returns:
        The QDQ model (nodes in topological order).
    """
    model = copy.deepcopy(model)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    head: list[onnx.NodeProto] = []  # weight DQ nodes: no inputs from the graph, go first
    new_inits: list[onnx.TensorProto] = []
    # ---------------------------------------------------------------------------------- biases
    if quantize_bias:
        for node in graph.node:
            if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
                continue
            x, w, b = node.input[0], node.input[1], node.input[2]
            if x not in acts or w not in weights or b not in inits:
                continue
            if node.op_type == "Gemm" and not any(
                    a.name == "transB" and a.i == 1 for a in node.attribute):
                continue
            bias = numpy_helper.to_array(inits[b]).astype(np.float64)  # (O,)
            ws = np.broadcast_to(weights[w].scale.astype(np.float64), bias.shape)
            scale = (acts[x].scale * ws).astype(np.float32)  # (O,)
            codes = np.round(bias / scale.astype(np.float64)).clip(-(2**31), 2**31 - 1)
            graph.initializer.remove(inits.pop(b))
            new_inits += [numpy_helper.from_array(codes.astype(np.int32), f"{b}_quantized"),
                          numpy_helper.from_array(scale, f"{b}_scale"),
                          numpy_helper.from_array(np.zeros_like(codes, np.int32), f"{b}_zp")]
            head.append(helper.make_node("DequantizeLinear", [f"{b}_quantized", f"{b}_scale",
                                                              f"{b}_zp"], [b], axis=0,
                                         name=f"{b}_DequantizeLinear"))
    # --------------------------------------------------------------------------------- weights
    for name, qw in weights.items():
        if name not in inits:
            continue
        graph.initializer.remove(inits.pop(name))
        scale = np.asarray(qw.scale, np.float32)
        new_inits += [numpy_helper.from_array(np.asarray(qw.codes, np.int8), f"{name}_quantized"),
                      numpy_helper.from_array(scale, f"{name}_scale"),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zp")]
        kwargs = {"axis": int(qw.axis)} if scale.ndim else {}
        head.append(helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale",
                                                          f"{name}_zp"], [name],
                                     name=f"{name}_DequantizeLinear", **kwargs))
    # ----------------------------------------------------------------------------- activations
    nodes: list[onnx.NodeProto] = list(graph.node)
    renamed = {}
    act_nodes: dict[str, list[onnx.NodeProto]] = {}
    for t, qa in acts.items():
        dtype = np.int8 if qa.signed else np.uint8
        new_inits += [numpy_helper.from_array(np.array(qa.scale, np.float32), f"{t}_scale"),
                      numpy_helper.from_array(np.array(qa.zero_point, dtype), f"{t}_zp")]
        src, act_nodes[t] = t, []
        if qa.bits < 8:  # QuantizeLinear saturates at the 8-bit limits only
            lo, hi = qa.float_range()
            new_inits += [numpy_helper.from_array(np.array(lo, np.float32), f"{t}_lo"),
                          numpy_helper.from_array(np.array(hi, np.float32), f"{t}_hi")]
            src = f"{t}_clipped"
            act_nodes[t].append(helper.make_node("Clip", [t, f"{t}_lo", f"{t}_hi"], [src],
                                                 name=f"{t}_Clip"))
        act_nodes[t] += [
            helper.make_node("QuantizeLinear", [src, f"{t}_scale", f"{t}_zp"], [f"{t}_q"],
                             name=f"{t}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{t}_q", f"{t}_scale", f"{t}_zp"],
                             [f"{t}_dq"], name=f"{t}_DequantizeLinear"),
        ]
        renamed[t] = f"{t}_dq"
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    graph_inputs = {i.name for i in graph.input}
    ordered: list[onnx.NodeProto] = list(head)
    for t in acts:  # quantizers of graph inputs first
        if t in graph_inputs:
            ordered += act_nodes.pop(t)
    for node in nodes:
        ordered.append(node)
        for o in node.output:
            if o in act_nodes:
                ordered += act_nodes.pop(o)
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_inits)
    return model


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every W8A8 layer replaced by its float form (same names)."""
    from netpress.nn.ptq import W8A8Conv2d, W8A8Linear

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, (W8A8Conv2d, W8A8Linear)):
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, module.to_float())
    return twin


def _module_for(weight_name: str, modules: dict[str, nn.Module]) -> str | None:
    for prefix in ("model.", ""):
        if weight_name.startswith(prefix) and weight_name.endswith(".weight"):
            name = weight_name[len(prefix):-len(".weight")]
            if name in modules:
                return name
    return None


def export_qdq_onnx(model: nn.Module, example: Batch, path: str | os.PathLike[str]) -> Path:
    """Export a model holding W8A8 layers as a QDQ ONNX file (integer kernels in ORT/OpenVINO).

    The float twin (dequantized weights) is exported with the TorchScript exporter, then each W8A8
    layer's int8 codes, weight scales, input quantizer, int32 bias and (``quantize_output``)
    output quantizer are written into the graph with :func:`insert_qdq`.

    Args:
        model: a model after ``quantize: {method: ptq}`` (or reloaded from its artifact).
        example: one input batch (batch 1 is typical; the batch axis stays dynamic).
        path: the ``.onnx`` file to write.

    Returns:
        ``path``.

    Example:
        >>> import tempfile, pathlib, torch, torch.nn as nn
        >>> from netpress.nn.ptq import W8A8Linear
        >>> net = nn.Sequential(W8A8Linear.from_float(nn.Linear(4, 3), 0.02, 128))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = export_qdq_onnx(net, Batch((torch.randn(1, 4),)), pathlib.Path(d, "q.onnx"))
        ...     sorted({n.op_type for n in onnx.load(p).graph.node})
        ['DequantizeLinear', 'Gemm', 'QuantizeLinear']
    """
    from netpress.export.onnx import export_onnx
    from netpress.nn.ptq import W8A8Conv2d, W8A8Linear

    qmods = {n: m for n, m in model.named_modules() if isinstance(m, (W8A8Conv2d, W8A8Linear))}
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = onnx.load(export_onnx(float_twin(model).eval(), example, Path(tmp, "fp32.onnx")))
    graph = fp32.graph
    weights: dict[str, QuantWeight] = {}
    acts: dict[str, QuantAct] = {}
    for node in graph.node:
        if node.op_type not in LINEAR_OPS or len(node.input) < 2:
            continue
        name = _module_for(node.input[1], qmods)
        if name is None:
            continue
        m = qmods[name]
        weights[node.input[1]] = QuantWeight(m.qweight.numpy(), m.weight_scale.numpy(), 0)
        acts.setdefault(node.input[0], QuantAct(float(m.input_scale), int(m.input_zero_point),
                                                m.act_signed, m.act_bits))
        if m.quantize_output:
            acts.setdefault(node.output[0], QuantAct(float(m.output_scale),
                                                     int(m.output_zero_point), m.out_signed,
                                                     m.act_bits))
    qdq = insert_qdq(fp32, weights, acts)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(qdq, str(path))
    return path


__all__ = ["QuantAct", "QuantWeight", "consumers", "export_qdq_onnx", "float_twin", "insert_qdq",
           "producers"]
