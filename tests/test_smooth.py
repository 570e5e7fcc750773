"""SmoothQuant-style static W8A8 (``method: smoothquant``): smoothing, grouping, QDQ ONNX on ONNX
Runtime / OpenVINO, artifact reload, bad input."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
import torch.nn as nn

from netpress.api import quantize
from netpress.core.config import StageContext, parse_config
from netpress.core.data import Batch
from netpress.core.errors import DataError, ModelError, RecipeError
from netpress.export.onnx import OnnxRunner
from netpress.nn import smooth as nn_smooth
from netpress.nn.smooth import SmoothQuantLinear
from netpress.quantize import smooth
from netpress.quantize.smooth import SmoothQuantConfig, export_smoothquant_onnx, quantize_smoothquant


class Block(nn.Module):
    """A post-LN transformer-like block: LN output feeds q/k/v and the residual; an FFN."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.ln(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 4.0, -1) @ self.v(h)
        h = h + att
        return h + self.down(torch.nn.functional.gelu(self.up(h)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = Block().eval()
    with torch.no_grad():  # a LayerNorm outlier channel, as in BERT
        net.ln.weight[3] = 40.0
    return net


def _data(n: int = 2, seed: int = 1) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch((torch.randn(8, 12, 16, generator=g),)) for _ in range(n)]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def test_smoothing_beats_plain_w8a8_on_outlier_channels():
    net, data = _net(), _data()
    x = _data(1, seed=7)[0].inputs[0]
    with torch.no_grad():
        ref = net(x)
        full = {"overflow_fix": "off"}  # the full int8 weight range, whatever this CPU
        plain = quantize(_net(), {"method": "smoothquant", "alpha": 0.0, "weights": full},
                         data=data)(x)
        smoothed = quantize(_net(), {"method": "smoothquant", "alpha": 0.8, "weights": full},
                            data=data)(x)
    e_plain, e_smooth = _err(plain, ref), _err(smoothed, ref)
    assert e_smooth < e_plain / 4, (e_plain, e_smooth)
    assert e_smooth < 1e-3


def test_qkv_share_one_smoothing_and_quantizer():
    ctx = StageContext(data=_data())
    q = quantize_smoothquant(_net(), SmoothQuantConfig(), ctx)
    rep = ctx.report["smoothquant"]
    assert rep["groups"] == [["q", "k", "v"]]
    assert torch.equal(q.q.smooth, q.v.smooth) and float(q.q.input_scale) == float(q.k.input_scale)
    assert not torch.equal(q.q.smooth, q.up.smooth)  # the FFN has its own factors
    assert float(q.q.smooth[3]) > 5 * float(q.q.smooth.median())  # the outlier channel moved
    assert isinstance(q.down, SmoothQuantLinear) and q.down.qweight.dtype == torch.int8


def test_onnx_qdq_runs_integer_and_matches_torch(tmp_path):
    import onnx

    data = _data()
    q = quantize(_net(), {"method": "smoothquant"}, data=data)
    x = _data(1, seed=7)[0]
    info = export_smoothquant_onnx(q, x.slice(1), tmp_path / "q.onnx")
    assert sorted(info["integer"]) == ["down", "k", "q", "up", "v"] and info["float"] == []
    graph = onnx.load(tmp_path / "q.onnx").graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == 3  # one shared by q/k/v, one per FFN Linear
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= 5 * 2  # codes and zero points of the five weights
    # the residual Add still reads the float LayerNorm output, not the quantized one
    ln_out = next(n.output[0] for n in graph.node if n.op_type == "LayerNormalization")
    readers = {n.op_type for n in graph.node if ln_out in n.input}
    assert "Add" in readers and "MatMul" not in readers
    with torch.no_grad():
        want = q(x.inputs[0]).numpy()
    got = OnnxRunner(tmp_path / "q.onnx", threads=1).run(x)
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()
    from netpress.export.openvino import OpenVinoRunner

    got_ov = OpenVinoRunner(tmp_path / "q.onnx", threads=1, precision="f32").run(x)
    assert np.abs(got_ov - want).max() < 2e-2 * np.abs(want).max()


def test_artifact_reload_without_pickle(tmp_path):
    from netpress.api import load
    from netpress.export.artifact import save_artifact

    q = quantize(_net(), {"method": "smoothquant"}, data=_data())
    save_artifact(q, tmp_path / "art", source={"kind": "module", "factory": f"{__name__}:_net"},
                  recipe={}, metrics=None)
    back = load(tmp_path / "art")
    x = _data(1, seed=3)[0].inputs[0]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert isinstance(back.up, SmoothQuantLinear) and back.up.qweight.dtype == torch.int8


def test_bad_input_errors():
    with pytest.raises(DataError):
        quantize(_net(), {"method": "smoothquant"}, data=[])
    with pytest.raises(DataError, match="smoothquant calibration data"):
        quantize_smoothquant(_net(), SmoothQuantConfig(), StageContext(data=[]))
    net = _net()
    with torch.no_grad():  # finite inputs, but the activations reaching q/k/v are NaN
        net.ln.weight[0] = float("nan")
    with pytest.raises(DataError, match="layer q"):
        quantize(net, {"method": "smoothquant"}, data=_data())
    net = _net()
    with torch.no_grad():
        net.up.weight[0, 0] = float("inf")
    with pytest.raises(ModelError, match="up"):
        quantize(net, {"method": "smoothquant"}, data=_data())
    with pytest.raises(RecipeError):
        parse_config("quantize", {"method": "smoothquant", "alpha": 1.5})
    with pytest.raises(RecipeError):
        parse_config("quantize", {"method": "smoothquant", "weights": {"bits": 4}})
    with pytest.raises(RecipeError):
        parse_config("quantize", {"method": "smoothquant", "smoothing": True})
    with pytest.raises(RecipeError, match="targets"):
        quantize(_net(), {"method": "smoothquant", "targets": ["ln"]}, data=_data())
    with pytest.raises(ModelError, match="SmoothQuantLinear"):
        export_smoothquant_onnx(_net(), _data(1)[0], "/nonexistent/never.onnx")


@pytest.mark.parametrize("module", [smooth, nn_smooth])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_export_onnx_dispatches_and_recipe_registers(tmp_path):
    """`export_onnx` (what compress/deploy call) writes the integer graph; recipes know the method."""
    import onnx

    from netpress.core.config import get_technique
    from netpress.export.onnx import export_onnx

    assert get_technique("quantize", "smoothquant").config_cls is SmoothQuantConfig
    q = quantize(_net(), {"method": "smoothquant"}, data=_data())
    x = _data(1, seed=5)[0]
    path = export_onnx(q, x.slice(1), tmp_path / "g.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("QuantizeLinear") == 3
    with torch.no_grad():
        want = q(x.inputs[0]).numpy()
    got = OnnxRunner(path, threads=1).run(x)
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()
