"""Suite ``magnitude``: the foundation techniques next to what a user of plain torch / ORT gets.

Cases (ONNX Runtime, 2 threads, batch 1; metric on held-out data):
  * digits CNN, 50% global magnitude pruning: netpress (sparse artifact) vs
    ``torch.nn.utils.prune.global_unstructured`` (same scores, dense safetensors).
  * MobileNetV2 and digits CNN, int8 per-channel weights (BN folded first; for MobileNetV2 also
    the demo's variant with depthwise convs kept fp32): netpress ``int8_weight`` vs
    ``onnxruntime.quantization.quantize_dynamic`` (its defaults) on the fp32 ONNX.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

from netpress.api import apply
from netpress.bench.common import Bench, artifact_bytes, open_bench, plain_safetensors_bytes, timed
from netpress.demo import RECIPES


def _fp32_row(b: Bench, case: str) -> dict[str, Any]:
    b.fp32_latency_ms = None  # each case's speed-ups are against its own fp32 row
    d = b.deployed(b.work.model, f"{case}-fp32")
    return b.measure(case, "onnxruntime", "fp32", d, plain_safetensors_bytes(b.work.model, b, "fp32"), None)


def _torch_prune_anchor(b: Bench, case: str, sparsity: float) -> dict[str, Any]:
    import torch.nn.utils.prune as tprune

    def run() -> nn.Module:
        m = copy.deepcopy(b.work.model)
        kinds = (nn.Conv2d, nn.Conv1d, nn.Linear)
        params = [(mod, "weight") for mod in m.modules() if isinstance(mod, kinds)]
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)
        for mod, name in params:
            tprune.remove(mod, name)
        return m

    m, secs = timed(run)
    d = b.deployed(m, f"{case}-torchprune")
    return b.measure(case, "torch", "nn.utils.prune.global_unstructured L1", d,
                     plain_safetensors_bytes(m, b, "torchprune"), secs, "state dict saved dense")


def _netpress(b: Bench, case: str, stage: str, config: dict[str, Any], method: str) -> dict[str, Any]:
    m, secs = timed(lambda: apply(stage, b.work.model, config))
    d = b.deployed(m, f"{case}-netpress")
    return b.measure(case, "netpress", method, d, artifact_bytes(m, b, case), secs)


def _ort_dynamic_anchor(b: Bench, case: str) -> dict[str, Any]:
    from onnxruntime.quantization import quantize_dynamic

    src = b.scratch / f"{case}-fp32.onnx"
    dst = b.scratch / f"{case}-ort-dynamic.onnx"
    _, secs = timed(lambda: quantize_dynamic(str(src), str(dst)))
    return b.measure(case, "onnxruntime", "quantize_dynamic (defaults)", b.onnx_file(dst),
                     dst.stat().st_size, secs, "size is the .onnx file")


def run(quick: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    b, tmp = open_bench("magnitude", "zoo:digits_cnn", "zoo:digits")
    with tmp:
        case = "digits_cnn_prune50"
        rows.append(_fp32_row(b, case))
        rows.append(_netpress(b, case, "prune", {"method": "magnitude", "sparsity": 0.5, "scope": "global"},
                              "magnitude global 50%"))
        rows.append(_torch_prune_anchor(b, case, 0.5))
        case = "digits_cnn_int8_weight"
        rows.append(_fp32_row(b, case))
        rows.append(_netpress(b, case, "quantize", {"method": "int8_weight"}, "int8_weight per-channel"))
        rows.append(_ort_dynamic_anchor(b, case))
    b, tmp = open_bench("magnitude", "zoo:mobilenet_v2", "zoo:photos", eval_limit=64 if quick else None)
    with tmp:
        case = "mobilenet_v2_int8_weight"
        rows.append(_fp32_row(b, case))
        rows.append(_netpress(b, case, "quantize", {"method": "int8_weight"}, "int8_weight per-channel"))
        demo = RECIPES["mobilenet_v2"]["stages"][0]["quantize"]  # depthwise convs kept fp32
        rows.append(_netpress(b, case, "quantize", demo, "int8_weight per-channel, depthwise fp32"))
        rows.append(_ort_dynamic_anchor(b, case))
    return rows


__all__ = ["run"]
