"""Static W8A8 PTQ (Q3): BN folding, W8A8 modules, QDQ ONNX on ORT/OpenVINO, artifact reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from netpress.api import quantize
from netpress.core.config import StageContext, parse_config
from netpress.core.data import Batch
from netpress.core.errors import DataError, ModelError, RecipeError
from netpress.export.onnx import OnnxRunner
from netpress.nn.ptq import W8A8Conv2d, W8A8Linear
from netpress.quantize.fold import fold_batchnorm
from netpress.quantize.ptq import quantize_ptq
from netpress.quantize.qdq_onnx import export_qdq_onnx


class Block(nn.Module):
    """A residual block (conv -> BN -> ReLU6 -> depthwise -> BN + skip), like MobileNetV2's."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6(),
                                  nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                                  nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), Block(8),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture
def data():
    torch.manual_seed(1)
    return [Batch((torch.randn(16, 3, 12, 12),)) for _ in range(2)]


def test_fold_batchnorm_exact():
    net = _net()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        ref = net(x)
    folded = fold_batchnorm(net)
    assert folded == ["0", "3.conv.0", "3.conv.3"]
    with torch.no_grad():
        assert float((net(x) - ref).abs().max()) < 1e-5  # measured ~1e-6


def test_ptq_small_cnn_numerics_onnx_and_reload(data, tmp_path):
    net = _net()
    ctx = StageContext(data=data)
    q = quantize_ptq(_net(), parse_config("quantize", {"method": "ptq"}), ctx)
    kinds = [type(m).__name__ for m in q.modules() if isinstance(m, (W8A8Conv2d, W8A8Linear))]
    assert kinds == ["W8A8Conv2d", "W8A8Conv2d", "W8A8Conv2d", "W8A8Linear"]
    rep = ctx.report["ptq"]
    assert rep["kept_float"] == {} and rep["calibration_examples"] == 32
    assert rep["quantized_outputs"] == ["3.conv.3"]  # the conv feeding the residual Add
    assert q[0].qweight.dtype == torch.int8 and q[0].weight_scale.shape == (8,)
    x = data[0].inputs[0]
    with torch.no_grad():
        ref, got = net(x), q(x)
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.05  # measured ~0.01 (int8 weights + uint8 activations)
    # QDQ ONNX: integer graph, agrees with the torch simulation
    path = export_qdq_onnx(q, data[0].slice(1), tmp_path / "q.onnx")
    import onnx

    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("QuantizeLinear") == 5  # input, 2 convs' inputs, residual output, fc input
    out = OnnxRunner(path, threads=1).run(data[0])
    assert float(np.abs(out - got.numpy()).max()) < 0.05 * float(got.abs().max())
    from netpress.export.openvino import OpenVinoRunner

    ov_out = OpenVinoRunner(path, threads=1).run(data[0])
    assert float(np.abs(ov_out - out).max()) < 0.05 * float(np.abs(out).max())
    # int8 codes and quantizers are buffers; the module rebuilds from its JSON spec (no pickle)
    from netpress.nn import build_module, module_spec

    spec = module_spec(q[0])
    rebuilt = build_module(spec)
    rebuilt.load_state_dict(q[0].state_dict())
    assert torch.equal(rebuilt(x), q[0](x))


def test_per_tensor_falls_back_with_warning(data):
    net = _net()
    with torch.no_grad():
        net[3].conv[3].weight[0].mul_(200.0)  # one depthwise filter with a huge range
    with pytest.warns(UserWarning, match="per_tensor weights collapse"):
        q = quantize(net, {"method": "ptq", "weights": {"granularity": "per_tensor"}}, data=data)
    assert q[3].conv[3].per_channel and not q[0].per_channel


def test_bad_input_errors(data):
    with pytest.raises(RecipeError, match="bits"):
        parse_config("quantize", {"method": "ptq", "weights": {"bits": 12}})
    with pytest.raises(RecipeError):
        parse_config("quantize", {"method": "ptq", "activations": {"observer": "median"}})
    with pytest.raises(DataError, match="calibration"):
        quantize(_net(), {"method": "ptq"}, data=None)
    bad = _net()
    with torch.no_grad():
        bad[3].conv[0].weight[0, 0] = float("inf")
    with pytest.raises(ModelError, match=r"^3\.conv\.0: .*NaN/Inf"):  # named, not blamed on 3.conv.3
        quantize(bad, {"method": "ptq"}, data=data)
    last = _net()
    with torch.no_grad():
        last[6].weight[0, 0] = float("nan")  # used to become scale 1.0, codes 0: silently wrong
    with pytest.raises(ModelError, match=r"^6: .*NaN/Inf.*ignore"):
        quantize(last, {"method": "ptq"}, data=data)
    with pytest.raises(RecipeError, match="at least one nn.Conv2d / nn.Linear"):
        quantize(nn.Sequential(nn.Conv1d(3, 3, 1)), {"method": "ptq"},
                 data=[Batch((torch.randn(4, 3, 5),))])


def test_artifact_reload_without_pickle(data, tmp_path):
    from netpress.api import load
    from netpress.export.artifact import save_artifact
    from netpress.export.onnx import export_onnx

    q = quantize(_net(), {"method": "ptq"}, data=data)
    save_artifact(q, tmp_path / "art", source={"kind": "module", "factory": f"{__name__}:_net"},
                  recipe={}, metrics=None)
    back = load(tmp_path / "art")
    x = data[1].inputs[0]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert isinstance(back[0], W8A8Conv2d) and back[0].qweight.dtype == torch.int8
    # export_onnx dispatches W8A8 models to the QDQ emitter (integer kernels)
    import onnx

    path = export_onnx(back, data[0].slice(1), tmp_path / "m.onnx")
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(path).graph.node}


@pytest.mark.real
def test_mobilenet_v2_per_tensor_weights_collapse_and_fall_back():
    """Krishnamoorthi 2018: per-tensor weights collapse on BN-folded MobileNetV2. netpress shows
    the collapse per layer and, asked for per_tensor, quantizes those layers per channel."""
    from netpress.quantize.ptq import per_tensor_collapse
    from netpress.zoo import load_model

    model = load_model("mobilenet_v2")
    fold_batchnorm(model)
    collapsed = per_tensor_collapse(model, bits=8, min_sqnr_db=10.0)
    # measured: 15 of 53 layers, worst channels at 0.0 dB (rounded to zero), including the first
    # conv and the first depthwise conv
    assert "features.0.0" in collapsed and "features.1.conv.0.0" in collapsed
    assert len(collapsed) >= 10 and min(collapsed.values()) < 1.0


@pytest.mark.real
def test_mobilenet_v2_per_tensor_ptq_collapses_and_the_fallback_recovers_it():
    """The same, end to end on held-out photo crops: forced per-tensor W8A8 PTQ loses a fifth
    of the top-1 agreement with fp32 (a fall, not the published 0.1 % top-1, whose set-up
    differs; the gap was not investigated), the default fallback warns and agrees like
    per-channel."""
    from netpress.zoo import load_data, load_model

    model, data = load_model("mobilenet_v2"), load_data("photos")
    crops = data.evaluation[0].slice(32)  # held out: calibration uses its own split
    with torch.no_grad():
        ref = model(crops.inputs[0]).argmax(1)

    def agreement(cfg):
        q = quantize(model, {"method": "ptq", "calibration_examples": 32, **cfg},
                     data=data.calibration)
        with torch.no_grad():
            return float((q(crops.inputs[0]).argmax(1) == ref).float().mean())

    forced = agreement({"weights": {"granularity": "per_tensor"}, "per_tensor_fallback": False})
    with pytest.warns(UserWarning, match="collapse on 15 layers.*per_channel"):
        fallback = agreement({"weights": {"granularity": "per_tensor"}})
    per_channel = agreement({})
    # measured on these 32 crops: forced 0.69, fallback 0.91, per-channel 0.88
    assert forced < per_channel - 0.1 and abs(fallback - per_channel) <= 0.1


@pytest.mark.parametrize("bits", [4, 6])
def test_low_bit_activations_saturate_in_the_qdq_export(data, tmp_path, bits):
    """Codes of fewer than 8 bits saturate at their own range in ONNX Runtime and OpenVINO as in
    the torch simulation, also for inputs far outside the calibrated range (a ``Clip`` precedes
    each such ``QuantizeLinear``). No residual block here: the export quantizes a skip branch's
    tensor where the simulation adds the float one, which differs once inputs leave the range."""
    import onnx

    from netpress.export.openvino import OpenVinoRunner

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    q = quantize_ptq(net, parse_config("quantize", {"method": "ptq",
                                                        "activations": {"bits": bits}}),
                     StageContext(data=data))
    assert {m.act_bits for m in q.modules() if isinstance(m, (W8A8Conv2d, W8A8Linear))} == {bits}
    path = export_qdq_onnx(q, data[0].slice(1), tmp_path / "q.onnx")
    nodes = onnx.load(path).graph.node
    clips = [n for n in nodes if n.op_type == "Clip" and n.name.endswith("_Clip")]  # not ReLU6's
    assert len(clips) == [n.op_type for n in nodes].count("QuantizeLinear") == 3
    big = Batch((4 * data[0].inputs[0],))  # 4x the calibrated range: most codes saturate
    with torch.no_grad():
        want = q(big.inputs[0]).numpy()
    for runner in (OnnxRunner(path, threads=1), OpenVinoRunner(path, threads=1)):
        got = runner.run(big)
        # measured: 5e-5 / 2e-3 of max |want| (bits 4 / 6); without the Clip 0.17 / 0.16
        assert float(np.abs(got - want).max()) < 0.01 * float(np.abs(want).max())
