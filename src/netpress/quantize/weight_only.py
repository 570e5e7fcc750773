"""Weight-only low-bit quantization of Linear layers (SPEC Q6): ``rtn``, ``gptq`` and ``awq``.

Recipe spelling::

    quantize: {method: rtn,  weights: {bits: 4, group_size: 128}}
    quantize: {method: gptq, weights: {bits: 4, group_size: 32}, act_order: true, damp: 0.01}
    quantize: {method: awq,  weights: {bits: 4, group_size: 128}}

Every targeted ``nn.Linear`` becomes a :class:`netpress.nn.lowbit.LowBitLinear` holding packed
unsigned codes with one float32 scale and one zero code per group of ``group_size`` input features
(asymmetric, the layout of ONNX Runtime's ``MatMulNBits``). Activations stay float.

* ``rtn``: round to nearest, with an MSE search of the clipping range per group (``clip_search``).
* ``gptq`` (:mod:`netpress.quantize.gptq`): one layer at a time, in forward order; a hook captures
  *that* layer's inputs on the calibration batches with every earlier layer already quantized
  (true-sequential), ``H = 2 XᵀX / n + damping``, Cholesky-based column updates with lazy batches,
  optional act-order.
* ``awq`` (:mod:`netpress.quantize.awq`): per-input-channel scales ``s = mean|x|^α`` searched on the
  calibration inputs, then RTN of ``W · diag(s)``; the layer divides its input by ``s``.

Execution: torch unpacks the codes once at first use; :func:`export_matmul_nbits` writes an ONNX
file whose 4-bit layers run ``com.microsoft::MatMulNBits`` in ONNX Runtime (other widths stay
``MatMul`` on the dequantized weight); ``ctx.report[method]`` says which path each layer takes.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.api import quantize
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> q = quantize(model, {"method": "rtn", "weights": {"bits": 4, "group_size": 32}})
    >>> [type(m).__name__ for m in q]
    ['LowBitLinear', 'ReLU', 'LowBitLinear']
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.errors import DataError, RecipeError
from netpress.core.targeting import select
from netpress.quantize.lowbit_build import _FloatTwin, dequantized, lowbit_from_codes
from netpress.quantize.qscheme import check_finite
from netpress.quantize.sequential import release_file_pages


class LowBitWeights(BaseModel):
    """``weights:`` of a weight-only method.

    Attributes:
        bits: code width 2..8 (4 runs MatMulNBits in ONNX Runtime).
        group_size: input features per scale/zero group; must divide every targeted layer's
            ``in_features`` (32 or 128 are the usual choices).
    """

    model_config = ConfigDict(extra="forbid")
    bits: int = Field(default=4, ge=2, le=8, strict=True)
    group_size: int = Field(default=128, ge=8, strict=True)


class _WeightOnlyBase(TechniqueConfig):
    weights: LowBitWeights = Field(default_factory=LowBitWeights)
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)


class RTNConfig(_WeightOnlyBase):
    """``rtn``: round to nearest per group; ``clip_search`` picks each group's range by MSE."""

    method: Literal["rtn"] = "rtn"
    clip_search: bool = True


class GPTQConfig(_WeightOnlyBase):
    """``gptq``: Hessian-aware rounding.

    Attributes:
        damp: damping added to the Hessian diagonal, as a fraction of its mean.
        act_order: quantize columns in order of decreasing Hessian diagonal (groups stay contiguous:
            their scales are fixed before the sweep).
        block_size: columns per lazy batch update.
        clip_search: MSE search of each group's clipping range.
    """

    method: Literal["gptq"] = "gptq"
    damp: float = Field(default=0.01, gt=0, le=1)
    act_order: bool = True
    block_size: int = Field(default=128, ge=1)
    clip_search: bool = True


class AWQConfig(_WeightOnlyBase):
    """``awq``: activation-aware scaling ``s = mean|x|^α`` searched over ``grid`` values of α."""

    method: Literal["awq"] = "awq"
    grid: int = Field(default=20, ge=2, le=100)
    clip_search: bool = True


def check_layer(name: str, module: nn.Linear, bits: int, group_size: int) -> None:
    """Raise a :class:`RecipeError` naming ``name`` when its shape cannot take ``group_size``."""
    k = module.in_features
    if k % group_size:
        divisors = [d for d in (256, 128, 64, 32, 16, 8) if k % d == 0][:3] or (
            [k] if k >= 8 else [])  # group_size >= 8: a narrower layer can only be ignored
        use = f"use group_size {' or '.join(map(str, divisors))}, or " if divisors else ""
        raise RecipeError(f"quantize layer {name}", got=f"group_size {group_size} for "
                          f"in_features {k}", expected=f"a group size that divides {k}",
                          fix=f"{use}add "
                          f"{name!r} to `ignore`")
    check_finite(module.weight, f"quantize layer {name} (weight)")


def clipped_qparams(w: torch.Tensor, bits: int, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale/zero of ``w (R, g)``; with ``search`` the range shrink minimising MSE.

    Returns:
        ``(scale (R,), zero (R,))``.
    """
    from netpress.nn.lowbit import group_qparams, quantize_codes

    scale, zero = group_qparams(w, bits)
    if not search:
        return scale, zero
    best = torch.full((w.shape[0],), float("inf"))
    for clip in torch.linspace(1.0, 0.6, 9).tolist():
        s, z = group_qparams(w, bits, clip)
        q = quantize_codes(w, s[:, None], z[:, None], bits)
        err = ((q - z[:, None]) * s[:, None] - w).pow(2).sum(1)  # (R,)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def rtn_codes(w: torch.Tensor, bits: int, group_size: int, search: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes of ``w (O, I)``.

    Returns:
        ``(codes (O, I), scales (O, I/g), zeros (O, I/g))`` as float32 tensors.
    """
    from netpress.nn.lowbit import quantize_codes

    groups = w.reshape(-1, group_size)  # (O * I/g, g)
    scale, zero = clipped_qparams(groups, bits, search)
    codes = quantize_codes(groups, scale[:, None], zero[:, None], bits).reshape(w.shape)
    shape = (w.shape[0], w.shape[1] // group_size)
    return codes, scale.reshape(shape), zero.reshape(shape)


def capture_inputs(model: nn.Module, layer: nn.Module, batches: list[Any], name: str,
                   stop: bool = True) -> torch.Tensor:
    """Inputs of ``layer`` on every batch, padding tokens dropped: ``(N, in_features)`` float32.

    The forward of each batch stops right after ``layer`` is reached (``stop``), so a layer deep in
    the model costs only the part of the forward before it. The hook is always removed.

    Raises:
        DataError: no batch reached the layer, or its inputs hold NaN/Inf (the layer is named).
    """
    from netpress.quantize.sequential import capture_runs, model_runs

    return capture_runs(model_runs(model, batches), layer, [], name, stop)[0]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


#: ``(name, linear, its inputs (N, I) -- or the ``sink`` they were fed to -- or None) -> module``
LayerFn = Callable[[str, nn.Linear, Any], nn.Module]


#: calibration batches are run in slices of at most this many examples while capturing inputs
#: (the activations of one forward, e.g. attention scores, scale with the batch). Measured on one
#: MiniLM block (1 thread, 100 sentences): slices of 32 left a transient of +36-39 MiB and took
#: 474 ms per slice; slices of 8 +3-7 MiB and 84 ms per slice (338 ms per 32 examples).
SUB_BATCH = 8


def _split(batches: list[Any], n: int) -> list[Any]:
    """``batches`` cut into slices of at most ``n`` examples (same order, same padding)."""
    from netpress.core.data import Batch

    out = []
    for b in batches:
        for i in range(0, b.size, n):
            if isinstance(b.inputs, dict):
                inputs: Any = {k: v[i:i + n] for k, v in b.inputs.items()}
            else:
                inputs = tuple(v[i:i + n] for v in b.inputs)
            out.append(Batch(inputs, None if b.target is None else b.target[i:i + n]))
    return out


def _sequential(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[Any],
                layer_fn: LayerFn, sink: Callable[[], Any] | None = None) -> dict[str, int]:
    """Quantize ``layers`` in order, each on its inputs with the earlier ones already quantized.

    Inputs come from the block cache when the model qualifies, else from whole-model forwards;
    layers fed one tensor share a capture (:mod:`netpress.quantize.sequential`). With ``sink``
    (a factory), each capture feeds a fresh sink instead of stacking the inputs and ``layer_fn``
    gets the sink. ``layers`` is emptied as it goes, so each float layer can be freed once
    replaced, and the file pages of its weight are released (a memory-mapped model:
    :func:`~netpress.quantize.sequential.release_file_pages`).

    Returns:
        How many captures each path took: ``{"block": n, "model": m}``.
    """
    from netpress.nn.lowbit import LowBitLinear
    from netpress.quantize.sequential import BlockCache, capture_runs, model_runs, trim_heap

    batches = _split(batches, SUB_BATCH)
    cache = BlockCache.build(model, batches, [n for n, _ in layers])
    counts = {"block": 0, "model": 0}
    twins: list[tuple[str, nn.Module]] = []  # quantized layers running as a _FloatTwin for now

    def install(name: str, old: nn.Module, new: nn.Module) -> None:
        if isinstance(new, LowBitLinear):
            twins.append((name, new))
            new = _FloatTwin(new)
        _set_submodule(model, name, new)
        release_file_pages(old.weight)  # the float weight is no longer the model's
        trim_heap()

    def settle(before_block: int | None) -> None:
        """The real quantized modules back in place of the twins (of blocks < ``before_block``)."""
        for entry in list(twins):
            blk = cache.block_of(entry[0]) if cache is not None else None
            if before_block is None or (blk is not None and blk < before_block):
                _set_submodule(model, *entry)
                twins.remove(entry)

    pending = layers  # consumed: a float layer is freed once its quantized twin is in the model
    try:
        while pending:
            name, module = pending.pop(0)
            blk = cache.block_of(name) if cache is not None else None
            if cache is not None and blk is not None and blk >= cache.index:
                cache.advance_to(model, blk)
                settle(cache.index)
                followers = [(n, m) for n, m in pending if cache.block_of(n) == blk]
                x, shared = capture_runs(cache.runs(), module, followers, name,
                                         sink=sink and sink())
                counts["block"] += 1
            else:
                if cache is not None and cache.index >= 0:
                    cache = None  # a layer outside the blocks changed after their inputs were cached
                x, shared = capture_runs(model_runs(model, batches), module, pending, name,
                                         sink=sink and sink())
                counts["model"] += 1
            if hasattr(x, "expect_uses"):  # a sink that can free itself after its last layer
                x.expect_uses(1 + len(shared))
            install(name, module, layer_fn(name, module, x))
            del module
            for other in shared:  # fed the same tensor (e.g. q, k, v): same inputs
                i = next(i for i, (n, _) in enumerate(pending) if n == other)
                follower = pending.pop(i)[1]
                install(other, follower, layer_fn(other, follower, x))
                del follower
            del x
    finally:
        settle(None)
    return counts


def quantize_linears(model: nn.Module, config: _WeightOnlyBase, ctx: StageContext,
                     layer_fn: LayerFn, needs_data: bool, sink: Callable[[], Any] | None = None
                     ) -> nn.Module:
    """Shared driver: select Linear layers, then quantize them one at a time in forward order.

    Args:
        model: modified in place and returned.
        config: the method's config.
        ctx: ``ctx.data`` (calibration batches) is required when ``needs_data``.
        layer_fn: ``(name, linear, inputs (N, I) or None) -> LowBitLinear``.
        needs_data: capture each layer's inputs (with earlier layers already quantized).
        sink: a factory of input sinks (``add(rows)``): ``layer_fn`` gets the sink its inputs
            were fed to, not the inputs (GPTQ: :class:`~netpress.quantize.gptq.HessianStats`).

    Raises:
        RecipeError: nothing to quantize, or a group size not dividing a layer's in_features.
        DataError: empty calibration set, or NaN/Inf in a layer's calibration inputs.
        ModelError: NaN/Inf in a weight.
    """
    method, bits, group = config.method, config.weights.bits, config.weights.group_size
    chosen = select(model, config.targets, config.ignore, default=(nn.Linear,),
                    where="quantize.targets")
    layers = [(n, m) for n, m in chosen if type(m) is nn.Linear]
    kept = [{"name": n, "reason": f"{type(m).__name__} is not an nn.Linear"}
            for n, m in chosen if type(m) is not nn.Linear]
    if not layers:
        raise RecipeError("quantize.targets", got=config.targets or "the default (Linear)",
                          expected="at least one nn.Linear to quantize",
                          fix="check `targets` / `ignore` (`netpress inspect` lists names)")
    for name, module in layers:
        check_layer(name, module, bits, group)
    names = [n for n, _ in layers]
    del chosen, module  # only `layers` refers to the float layers now (freed as they are replaced)
    batches = list(ctx.data or [])
    if needs_data and not batches:
        raise DataError(f"quantize: {{method: {method}}}", got="an empty calibration set",
                        expected="calibration batches (the layer inputs drive the rounding)",
                        fix="pass data=... (e.g. the zoo bundle's calibration split), or use "
                        "method: rtn, which needs none")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        captures = _sequential(model, layers, batches, layer_fn, sink) if needs_data else {}
        while layers:
            name, module = layers.pop(0)
            _set_submodule(model, name, layer_fn(name, module, None))
            release_file_pages(module.weight)
            del module
    finally:
        model.train(was_training)
    ctx.report[method] = {
        "bits": bits, "group_size": group, "quantized": names, "kept_float": kept,
        "seconds": round(time.perf_counter() - start, 2),
        "input_captures": captures,
        "execution": ("onnxruntime com.microsoft::MatMulNBits (int4 kernel) after "
                      "export_matmul_nbits; torch: unpacked once to float at first use"
                      if bits == 4 else "unpacked to float at load/first use (torch and ONNX)"),
    }
    return model


@register("quantize", "rtn", RTNConfig,
          summary="weight-only int2..int8 round-to-nearest, group-wise, packed (MatMulNBits at 4 bits)")
def quantize_rtn(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Round-to-nearest group-wise quantization of the targeted Linear layers (in place).

    Args:
        model: the model (modified and returned).
        config: an :class:`RTNConfig`.
        ctx: the stage context (no data needed); ``ctx.report["rtn"]`` is filled.

    Returns:
        ``model`` with :class:`~netpress.nn.lowbit.LowBitLinear` layers.

    Raises:
        RecipeError / ModelError: see :func:`quantize_linears`.

    Example:
        >>> import torch.nn as nn
        >>> ctx = StageContext()
        >>> m = quantize_rtn(nn.Sequential(nn.Linear(32, 4)), RTNConfig(weights={"group_size": 32}), ctx)
        >>> ctx.report["rtn"]["quantized"]
        ['0']
    """
    assert isinstance(config, RTNConfig)
    bits, group = config.weights.bits, config.weights.group_size

    def layer(name: str, module: nn.Linear, _x: torch.Tensor | None) -> nn.Module:
        codes, scales, zeros = rtn_codes(module.weight.detach().float(), bits, group,
                                         config.clip_search)
        return lowbit_from_codes(codes, scales, zeros, bits, module.bias)

    return quantize_linears(model, config, ctx, layer, needs_data=False)


__all__ = ["AWQConfig", "GPTQConfig", "LowBitWeights", "RTNConfig", "capture_inputs",
           "export_matmul_nbits", "check_layer", "clipped_qparams", "dequantized", "lowbit_from_codes",
           "quantize_linears", "quantize_rtn", "rtn_codes"]


# ---------------------------------------------------------------------------------------------
# ONNX Runtime: MatMulNBits (and the shared rewrite of exported Linear MatMuls)
# ---------------------------------------------------------------------------------------------
NBITS_KERNEL_BITS = (2, 4, 8)  # widths ONNX Runtime's MatMulNBits runs (block size a power of 2 >= 16)

# build(layer, a_input, output, tag, graph) -> list of nodes, or None to keep the float MatMul
NodeBuilder = Callable[[Any, str, str, str, Any], "list[Any] | None"]


def rewrite_linears_onnx(model: nn.Module, example: Any, path: Any, kinds: tuple[type, ...],
                         build: NodeBuilder) -> tuple[list[str], list[str]]:
    """Export ``model`` with layers of ``kinds`` replaced by integer ONNX ops.

    Each layer of ``kinds`` (it has ``float_weight()`` -> the weight the Linear applies to ``x``)
    becomes a float ``nn.Linear`` for the export; its ``MatMul`` / ``Gemm`` is then found by the
    exact bytes of the weight initializer and handed to ``build``, which returns the nodes computing
    ``x @ Wᵀ`` (the bias ``Add`` is kept).

    Returns:
        ``(rewritten layer names, layers left as float MatMul)``.
    """
    import copy
    from pathlib import Path

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from netpress.export.onnx import export_onnx

    twin = copy.deepcopy(model).eval()
    found: dict[bytes, tuple[str, Any]] = {}
    every: list[str] = []
    for name, module in list(twin.named_modules()):
        if not isinstance(module, kinds):
            continue
        every.append(name)
        w = module.float_weight()  # (O, I)
        lin = nn.Linear(module.in_features, module.out_features, module.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if module.bias is not None:
                lin.bias.copy_(module.bias)
        _set_submodule(twin, name, lin)
        wt = lin.weight.detach().numpy()
        found[wt.T.copy().tobytes()] = (name, module)  # MatMul(x, Wᵀ)
        found[wt.copy().tobytes()] = (name, module)  # Gemm(x, W, transB=1)
    path = Path(path)
    export_onnx(twin, example, path, exporter="torchscript")
    proto = onnx.load(str(path))
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    done: list[str] = []
    new_nodes: list[Any] = []
    for node in graph.node:
        hit = None
        if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2 and node.input[1] in inits:
            trans = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            if node.op_type == "MatMul" or (trans and not any(
                    a.name in ("transA", "alpha", "beta") and (a.i or a.f not in (0.0, 1.0))
                    for a in node.attribute)):
                arr = numpy_helper.to_array(inits[node.input[1]])
                hit = found.get(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
        tag = f"q{len(done)}"
        out = node.output[0] if node.op_type == "MatMul" else f"{tag}_y"
        nodes = None if hit is None else build(hit[1], node.input[0], out, tag, graph)
        if nodes is None:
            new_nodes.append(node)
            continue
        new_nodes.extend(nodes)
        if node.op_type == "Gemm":
            if len(node.input) > 2:
                new_nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]]))
            else:
                new_nodes.append(helper.make_node("Identity", [out], [node.output[0]]))
        done.append(hit[0])
    del graph.node[:]
    graph.node.extend(new_nodes)
    referenced = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in referenced]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return done, [n for n in every if n not in done]


def export_matmul_nbits(model: nn.Module, example: Any, path: Any, accuracy_level: int = 4
                        ) -> dict[str, Any]:
    """Export ``model`` to ONNX with its LowBitLinear layers on ``com.microsoft::MatMulNBits``.

    Every low-bit layer with 2, 4 or 8 bits and a power-of-two group size >= 16 runs
    ``MatMulNBits`` fed the layer's own packed bytes, scales and zero codes (AWQ layers get a
    ``Mul`` by ``1/s`` in front). Other layers (e.g. int3) stay ``MatMul`` on the dequantized weight.

    Args:
        model: a model holding :class:`~netpress.nn.lowbit.LowBitLinear` layers.
        example: an example :class:`~netpress.core.data.Batch`.
        path: the ``.onnx`` file to write.
        accuracy_level: MatMulNBits ``accuracy_level`` (4: int8 activations inside the kernel, the
            fast path on VNNI CPUs; 0: float compute, bit-exact with torch).

    Returns:
        ``{"path", "matmul_nbits": [layer names], "float_matmul": [layer names]}``.

    Raises:
        ModelError: the export fails (see :func:`netpress.export.onnx.export_onnx`).

    Example:
        >>> import tempfile, pathlib, torch, torch.nn as nn
        >>> from netpress.api import quantize
        >>> from netpress.core.data import Batch
        >>> q = quantize(nn.Sequential(nn.Linear(32, 8)), {"method": "rtn", "weights": {"group_size": 32}})
        >>> with tempfile.TemporaryDirectory() as d:
        ...     info = export_matmul_nbits(q, Batch((torch.randn(1, 32),)), pathlib.Path(d, "m.onnx"))
        >>> info["matmul_nbits"]
        ['0']
    """
    import numpy as np
    from onnx import helper, numpy_helper

    from netpress.nn.lowbit import LowBitLinear

    def build(layer: Any, a: str, out: str, tag: str, graph: Any) -> list[Any] | None:
        g = layer.group_size
        if layer.bits not in NBITS_KERNEL_BITS or g < 16 or g & (g - 1):
            return None
        n_blocks = layer.in_features // g
        qweight = layer.qweight.numpy().reshape(layer.out_features, n_blocks, g * layer.bits // 8)
        kpack = 8 // layer.bits
        zeros = layer.zero_codes().numpy().astype(np.uint8)  # (N, n_blocks)
        zeros = np.pad(zeros, ((0, 0), (0, (-n_blocks) % kpack)))  # each row packed on its own
        zp = np.zeros((layer.out_features, zeros.shape[1] // kpack), dtype=np.uint8)
        for j in range(kpack):
            zp |= (zeros[:, j::kpack] << (layer.bits * j)).astype(np.uint8)
        graph.initializer.extend([
            numpy_helper.from_array(qweight, f"{tag}_B"),
            numpy_helper.from_array(layer.scales.numpy().reshape(-1).astype(np.float32),
                                    f"{tag}_scales"),
            numpy_helper.from_array(zp.reshape(-1), f"{tag}_zp"),
        ])
        nodes = []
        if layer.input_scale is not None:
            inv = (1.0 / layer.input_scale).numpy().astype(np.float32)
            graph.initializer.append(numpy_helper.from_array(inv, f"{tag}_inv_s"))
            nodes.append(helper.make_node("Mul", [a, f"{tag}_inv_s"], [f"{tag}_a"]))
            a = f"{tag}_a"
        nodes.append(helper.make_node(
            "MatMulNBits", [a, f"{tag}_B", f"{tag}_scales", f"{tag}_zp"], [out],
            domain="com.microsoft", K=layer.in_features, N=layer.out_features, bits=layer.bits,
            block_size=g, accuracy_level=accuracy_level))
        return nodes

    done, left = rewrite_linears_onnx(model, example, path, (LowBitLinear,), build)
    return {"path": str(path), "matmul_nbits": done, "float_matmul": left}
