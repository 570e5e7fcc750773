"""Binary (Q7) and ternary (Q8) weights: exact formulas, packed bytes, reload, ONNX, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from netpress.api import quantize
from netpress.core.config import StageContext
from netpress.core.data import Batch, as_batches
from netpress.core.errors import ModelError, RecipeError
from netpress.export.artifact import load, save_artifact
from netpress.export.onnx import OnnxRunner, export_onnx
from netpress.nn.qat import PackedConv1d, PackedLinear
from netpress.quantize.fakequant import WeightFakeQuant, ternary_params


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),  # (B, 8, 16)
        nn.Conv1d(8, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Conv1d(16, 16, 3, stride=2, padding=1), nn.BatchNorm1d(16), nn.ReLU(),  # (B, 16, 8)
        nn.Flatten(), nn.Linear(16 * 8, 3),
    )


@pytest.fixture
def data() -> list[Batch]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(192, 1, 16, generator=g)
    y = (x[:, 0, :8].sum(1) > 0).long() + (x[:, 0, 8:].sum(1) > 0).long()
    return as_batches((x, y), batch_size=32)


def test_twn_delta_and_alpha_exact() -> None:
    w = torch.tensor([[0.9, -0.1, 0.5, -1.3], [0.2, 0.2, -0.2, 0.0]])
    delta, alpha = ternary_params(w)
    # row 0: mean|w| = 0.7 -> Δ = 0.49; |w| > Δ: 0.9, 0.5, 1.3 -> α = 0.9
    # row 1: mean|w| = 0.15 -> Δ = 0.105; 0.2, 0.2, 0.2 -> α = 0.2
    assert torch.allclose(delta, torch.tensor([0.49, 0.105]), atol=1e-7)
    assert torch.allclose(alpha, torch.tensor([0.9, 0.2]), atol=1e-7)
    q, s = WeightFakeQuant("ternary", 2, 2).codes_and_scale(w)
    assert q.tolist() == [[1, 0, 1, -1], [1, 1, -1, 0]]
    assert torch.allclose(s, alpha)


def test_bwn_alpha_is_mean_abs_and_gradients_pass() -> None:
    w = torch.tensor([[0.5, -0.25, 0.75, -0.5], [0.1, 0.3, -0.2, -0.2]], requires_grad=True)
    out = WeightFakeQuant("binary", 1, 2)(w)
    assert torch.allclose(out.detach(), torch.tensor([[0.5, -0.5, 0.5, -0.5],
                                                      [0.2, 0.2, -0.2, -0.2]]))
    out.sum().backward()
    assert w.grad is not None and bool((w.grad != 0).all())  # STE through sign
    tw = torch.randn(3, 5, requires_grad=True)
    WeightFakeQuant("ternary", 2, 3)(tw).sum().backward()
    assert torch.equal(tw.grad, torch.ones_like(tw))  # ternary STE: identity


def _check_reload_and_onnx(q: nn.Module, data: list[Batch], tmp_path, name: str) -> None:
    src = {"kind": "module", "factory": f"{__name__}:tiny_net"}
    save_artifact(q, tmp_path / name, source=src, recipe={})
    again = load(tmp_path / name)
    x = torch.cat([b.inputs[0] for b in data])
    with torch.no_grad():
        ref = q(x)
        assert torch.equal(again(x), ref)
    path = export_onnx(again, Batch((x[:1],)), tmp_path / f"{name}.onnx")
    out = OnnxRunner(path).run(Batch((x,)))
    assert float((out.argmax(1) == ref.numpy().argmax(1)).mean()) >= 0.98  # measured 1.0


def test_binary_bwn_packs_eight_per_byte(data: list[Batch], tmp_path) -> None:
    cfg = {"method": "binary", "variant": "bwn", "finetune": {"epochs": 2, "lr": 1e-3}}
    ctx_model = tiny_net()
    q = quantize(ctx_model, cfg, data=data)
    first, mid, last = q[0], q[3], q[10]
    assert isinstance(first, PackedConv1d) and first.weight_mode == "int" and first.bits == 8
    assert isinstance(last, PackedLinear) and last.bits == 8 and last.act_mode is None
    assert mid.weight_mode == "binary" and mid.bits == 1
    assert mid.qweight_packed.dtype == torch.uint8
    assert mid.qweight_packed.numel() == 16 * 8 * 3 // 8  # 8 weights per byte
    assert mid.weight_scale.dtype == torch.float16
    assert set(mid.codes().unique().tolist()) <= {-1, 1}
    assert mid.weight_bytes() == 48 + 16 * 2
    assert isinstance(q[1], nn.BatchNorm1d)  # BN stays float
    _check_reload_and_onnx(q, data, tmp_path, "bwn")


def test_xnor_binary_activations_and_binaryconnect(data: list[Batch], tmp_path) -> None:
    ctx = StageContext(data=data)
    from netpress.quantize.binary import BinaryConfig, quantize_binary

    q = quantize_binary(tiny_net(), BinaryConfig(variant="xnor", finetune={"epochs": 1}), ctx)
    rep = ctx.report["binary"]
    assert rep["activations"] == "binary"
    assert q[3].act_mode == "step" and q[3].act_scale > 0  # inputs after ReLU: {0, 1}·s
    assert rep["layers"]["3"]["act"] == "step"
    _check_reload_and_onnx(q, data, tmp_path, "xnor")
    bc = quantize(tiny_net(), {"method": "binary", "variant": "binaryconnect",
                               "finetune": {"epochs": 0}}, data=data)
    assert torch.equal(bc[3].weight_scale.float(), torch.ones(16))  # BinaryConnect: α = 1


def test_ternary_two_bits(data: list[Batch], tmp_path) -> None:
    ctx = StageContext(data=data)
    from netpress.quantize.ternary import TernaryConfig, quantize_ternary

    q = quantize_ternary(tiny_net(), TernaryConfig(finetune={"epochs": 2}), ctx)
    mid = q[6]
    assert mid.weight_mode == "ternary" and mid.bits == 2
    assert mid.qweight_packed.numel() == 16 * 16 * 3 // 4  # 4 weights per byte
    assert set(mid.codes().unique().tolist()) <= {-1, 0, 1}
    rep = ctx.report["ternary"]
    assert rep["first_last"] == ["0", "10"] and rep["weight_ratio"] > 4
    _check_reload_and_onnx(q, data, tmp_path, "twn")


def test_unsupported_layers_and_bad_config(data: list[Batch]) -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(16, 4), nn.Linear(4, 2))
    with pytest.raises(ModelError, match="^0: got 'Embedding'.*remove '0' from `targets`"):
        quantize(model, {"method": "binary", "targets": ["0", "2"]})
    ctx = StageContext(data=[Batch((torch.randint(0, 10, (4, 2)),), torch.zeros(4).long())])
    from netpress.quantize.binary import BinaryConfig, quantize_binary

    quantize_binary(model, BinaryConfig(targets=["re:.*"], first_last_bits=None,
                                        finetune={"epochs": 0}), ctx)
    kept = ctx.report["binary"]["kept_float"]
    assert [k["name"] for k in kept] == ["0", "1"] and "Embedding" in kept[0]["reason"]
    with pytest.raises(RecipeError, match="first_last_bits"):
        quantize(tiny_net(), {"method": "binary", "first_last_bits": 1})
    with pytest.raises(RecipeError, match="variant"):
        quantize(tiny_net(), {"method": "binary", "variant": "dorefa"})
    broken = tiny_net()
    broken[3].weight.data[0, 0, 0] = float("inf")
    with pytest.raises(ModelError, match="^3: .*NaN/Inf"):
        quantize(broken, {"method": "ternary"}, data=data)


def test_last_bits_and_fp16_scales_count_every_byte(data: list[Batch], tmp_path) -> None:
    ctx = StageContext(data=data)
    from netpress.quantize.binary import BinaryConfig, quantize_binary

    q = quantize_binary(tiny_net(), BinaryConfig(last_bits=2, finetune={"epochs": 1}), ctx)
    first, last = q[0], q[10]
    assert first.bits == 8 and last.bits == 2 and last.weight_mode == "int"
    assert first.weight_scale.dtype == last.weight_scale.dtype == torch.float16
    rep = ctx.report["binary"]
    assert rep["bits_per_layer"] == {"0": 8, "3": 1, "6": 1, "10": 2}
    # codes: 24 B (8-bit), 48 B + 96 B (1-bit), 384 * 2 / 8 = 96 B (2-bit); scales 8+16+16+3 fp16
    assert rep["weight_bytes"] == 24 + 48 + 96 + 96 + 2 * (8 + 16 + 16 + 3)
    state = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert rep["weight_bytes"] + rep["other_tensor_bytes"] == state
    _check_reload_and_onnx(q, data, tmp_path, "last2")
    binary_last = quantize(tiny_net(), {"method": "binary", "last_bits": 1,
                                        "finetune": {"epochs": 0}}, data=data)
    assert binary_last[10].weight_mode == "binary" and binary_last[0].bits == 8
