"""Multiply-accumulate counts of one forward pass, measured by running it.

The count comes from ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2), which sees
every ATen op the forward really executes, so it covers convolutions (grouped and depthwise
included), ``F.linear``, ``matmul``/``bmm`` and scaled-dot-product attention, whatever module or
functional call issued them. Modules that dequantize an integer weight and then call
``F.linear``/``F.conv2d`` are counted like their float originals; the integer kernels
``_int_mm``, ``_weight_int8pack_mm`` and ``_weight_int4pack_mm(_for_cpu)`` are counted too.
Element-wise work (activations, norms, bias adds, softmax) is not counted, as is customary.

Counts are for the batch given: pass a batch of one example to get MACs per example (the pipeline
does). Attention is counted in full (``T*T``) even when causal or masked.

Example:
    >>> import torch
    >>> from netpress.core.data import Batch
    >>> from netpress.measure.macs import count_macs
    >>> conv = torch.nn.Conv2d(3, 8, 3)
    >>> count_macs(conv, Batch((torch.zeros(1, 3, 10, 10),)))  # 8 out ch * 8*8 pixels * 3*3*3
    13824
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from netpress.core.data import Batch
from netpress.core.errors import ModelError
from netpress.measure._util import eval_mode

aten = torch.ops.aten


def _sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of attention from shapes: query (..., Tq, D), key (..., Tk, D), value (..., Tk, Dv)."""
    lead = math.prod(query[:-2])  # batch * heads
    tq, d = query[-2], query[-1]
    tk, dv = key[-2], value[-1]
    # Q @ K^T: lead*Tq*Tk*D MACs; softmax(.) @ V: lead*Tq*Tk*Dv MACs; 2 FLOPs per MAC.
    return 2 * lead * tq * tk * (d + dv)


def _out_times_k_flops(a: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of an (M, K) x (K or packed, N) integer matmul: 2 * numel(out) * K."""
    return 2 * math.prod(out_shape) * a[-1]


def _custom_mapping() -> dict[Any, Callable[..., int]]:
    mapping: dict[Any, Callable[..., int]] = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = _sdpa_flops
    for name in ("_int_mm", "_weight_int8pack_mm", "_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu"):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = _out_times_k_flops
    return mapping


def _run_counted(model: nn.Module, example: Batch) -> FlopCounterMode:
    if not isinstance(example, Batch):
        raise ModelError(
            "count_macs",
            got=type(example).__name__,
            expected="a netpress Batch",
            fix="wrap the inputs: Batch((x,)) or Batch({'input_ids': ...})",
        )
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    try:
        with eval_mode(model), torch.inference_mode(), counter:
            example.run(model)
    except Exception as exc:  # the user's forward failed: say so with the inputs' shapes
        raise ModelError(
            f"count_macs: forward of {type(model).__name__}",
            got=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            expected="a forward that runs on the example batch",
            fix="check the example's shapes/dtypes match what the model takes",
        ) from exc
    return counter


def count_macs(model: nn.Module, example: Batch) -> int:
    """Multiply-accumulates of ``model``'s forward on ``example`` (the whole batch given).

    Args:
        model: the model; it is run once in eval mode under ``torch.inference_mode`` (its training
            flag is restored afterwards).
        example: the inputs; pass a batch of one example for MACs per example.

    Returns:
        MACs as an int (FLOPs / 2 of conv, linear, matmul and attention ops).

    Raises:
        ModelError: ``example`` is not a Batch, or the forward fails on it.

    Example:
        >>> import torch
        >>> from netpress.core.data import Batch
        >>> count_macs(torch.nn.Linear(4, 3), Batch((torch.zeros(2, 4),)))  # 2 rows * 4 * 3
        24
    """
    counter = _run_counted(model, example)
    return int(counter.get_total_flops()) // 2


def macs_by_layer(model: nn.Module, example: Batch) -> dict[str, int]:
    """MACs executed directly by each module (its children excluded), for reports.

    A module's own MACs are the ops issued in its ``forward`` body outside its children, e.g. the
    attention matmuls of a self-attention block whose projections are child ``Linear`` layers. The
    values sum to :func:`count_macs`; ``""`` is the root module. Modules with no MACs are left out.

    Args:
        model: the model (run once, as in :func:`count_macs`).
        example: the inputs.

    Returns:
        ``{module name as in model.named_modules(): MACs}`` in ``named_modules()`` order.

    Raises:
        ModelError: as :func:`count_macs`.

    Example:
        >>> import torch
        >>> from netpress.core.data import Batch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> macs_by_layer(net, Batch((torch.zeros(1, 4),)))
        {'0': 12, '2': 6}
    """
    counter = _run_counted(model, example)
    raw = counter.get_flop_counts()
    root = type(model).__name__
    totals: dict[str, int] = {}
    for tracked, per_op in raw.items():
        if tracked == root:
            name = ""
        elif tracked.startswith(root + "."):
            name = tracked[len(root) + 1 :]
        else:
            continue  # "Global" and anything outside the model
        totals[name] = int(sum(per_op.values())) // 2
    global_macs = int(sum(raw.get("Global", {}).values())) // 2
    if global_macs > totals.get("", 0):
        totals[""] = global_macs  # ops outside any tracked module count for the root
    own = dict(totals)
    for name, macs in totals.items():
        if not name:
            continue
        # Subtract from the nearest *tracked* ancestor: containers such as ModuleList are never
        # called, so they are not tracked and their children's MACs belong to the caller.
        parent = name
        while parent:
            parent = parent.rpartition(".")[0]
            if parent in totals:
                own[parent] -= macs
                break
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return {name: macs for name, macs in sorted(own.items(), key=lambda kv: order.get(kv[0], -1)) if macs > 0}


__all__ = ["count_macs", "macs_by_layer"]
