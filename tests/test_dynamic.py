"""Q4 dynamic int8: DynamicQuantLinear, ORT DynamicQuantizeMatMul export, artifact, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from netpress.api import quantize as apply_quantize
from netpress.core.data import Batch
from netpress.core.errors import ModelError, RecipeError
from netpress.export.artifact import load, save_artifact
from netpress.export.onnx import OnnxRunner
from netpress.nn import DynamicQuantLinear
from netpress.quantize.dynamic import export_dynamic


def mlp() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16))


def test_dynamic_swaps_linears_and_stays_close() -> None:
    model = mlp().eval()
    q = apply_quantize(model, {"method": "dynamic", "weights": {"bits": 8,
                                                                 "granularity": "per_channel"}})
    assert [type(m).__name__ for m in q] == ["DynamicQuantLinear", "GELU", "DynamicQuantLinear"]
    assert q[0].qweight.dtype == torch.int8 and q[0].weight_scale.shape == (128,)
    x = torch.randn(8, 5, 64)
    with torch.no_grad():
        rel = float((q(x) - model(x)).norm() / model(x).norm())
    assert rel < 0.03  # measured 0.012


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_integer_onnx_matches_torch(runtime: str, tmp_path) -> None:
    q = apply_quantize(mlp().eval(), {"method": "dynamic"})
    x = torch.randn(4, 6, 64)
    info = export_dynamic(q, Batch((x[:1],)), tmp_path / "d.onnx", runtime=runtime)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "d.onnx")).graph.node]
    assert info["integer"] == ["0", "2"]
    want_op = "DynamicQuantizeMatMul" if runtime == "onnxruntime" else "DequantizeLinear"
    assert ops.count(want_op) == 2
    got = OnnxRunner(tmp_path / "d.onnx").run(Batch((x,)))
    with torch.no_grad():
        want = q(x).numpy()
    # onnxruntime: the same integer arithmetic, measured max |diff| 0.0;
    # DequantizeLinear (float activations) differs by the activation rounding, measured 0.006
    tol = 1e-4 if runtime == "onnxruntime" else 0.05
    assert np.abs(got - want).max() < tol


@pytest.mark.parametrize("runtime, op", [("onnxruntime", "com.microsoft:DynamicQuantizeMatMul"),
                                         ("openvino", ":DequantizeLinear")])
def test_export_onnx_writes_the_integer_graph_for_the_runtime(runtime, op, tmp_path) -> None:
    """export_onnx (what recipes and `netpress export` call) picks the integer exporter."""
    from netpress.export.onnx import export_onnx

    q = apply_quantize(mlp().eval(), {"method": "dynamic"})
    path = export_onnx(q, Batch((torch.randn(1, 64),)), tmp_path / "m.onnx", runtime=runtime)
    ops = [f"{n.domain}:{n.op_type}" for n in onnx.load(str(path)).graph.node]
    assert ops.count(op) == 2 and not any(o.startswith("com.microsoft") and o != op for o in ops)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # staged: nothing else left


def test_artifact_is_a_quarter_and_reloads(tmp_path) -> None:
    model = mlp().eval()
    source = {"kind": "module", "factory": f"{__name__}:mlp"}
    dense = save_artifact(model, tmp_path / "fp32", source=source, recipe={})
    q = apply_quantize(model, {"method": "dynamic"})
    man = save_artifact(q, tmp_path / "int8", source=source, recipe={})
    ratio = man["files"]["model.safetensors"]["bytes"] / dense["files"]["model.safetensors"]["bytes"]
    assert ratio < 0.3  # measured 0.283 (int8 codes + fp32 scales and biases + header)
    back = load(tmp_path / "int8")
    assert isinstance(back[0], DynamicQuantLinear)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_bad_input() -> None:
    with pytest.raises(RecipeError, match="weights.bits"):
        apply_quantize(mlp(), {"method": "dynamic", "weights": {"bits": 4}})
    model = mlp()
    with torch.no_grad():
        model[2].weight[1, 1] = float("inf")
    with pytest.raises(ModelError, match="layer 2"):
        apply_quantize(model, {"method": "dynamic"})


@pytest.mark.real
def test_minilm_dynamic_keeps_embeddings() -> None:
    import netpress.zoo as zoo
    from netpress.measure import collect_outputs, compute_metric

    model = zoo.load_model("minilm")
    batches = zoo.load_data("sentences").evaluation[:2]
    q = apply_quantize(model, {"method": "dynamic"})
    cos = compute_metric("cosine", collect_outputs(q, batches), batches,
                         collect_outputs(model, batches))
    assert cos > 0.985  # measured 0.993 on the whole evaluation split (ORT quantize_dynamic: 0.960)
