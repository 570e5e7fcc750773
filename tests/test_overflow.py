"""int8 overflow on CPUs without VNNI: 7-bit weight codes (ptq / smoothquant / qat) and ONNX
Runtime's exact kernels (quantize/overflow.py, export/onnx.make_session)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netpress.api import quantize
from netpress.core.config import StageContext, parse_config
from netpress.core.data import Batch
from netpress.core.errors import RecipeError
from netpress.export.onnx import OnnxRunner, make_session
from netpress.nn.ptq import W8A8Conv2d, W8A8Linear
from netpress.quantize import overflow
from netpress.quantize.ptq import quantize_ptq
from netpress.quantize.qdq_onnx import export_qdq_onnx
from test_ptq import _net


@pytest.fixture
def data():
    torch.manual_seed(1)
    return [Batch((torch.randn(16, 3, 12, 12),)) for _ in range(2)]


def _codes(model) -> list[int]:
    return [int(m.qweight.abs().max()) for m in model.modules()
            if isinstance(m, (W8A8Conv2d, W8A8Linear))]


@pytest.mark.parametrize("saturates", [True, False])
def test_auto_follows_the_cpu(monkeypatch, saturates):
    monkeypatch.setattr(overflow, "u8s8_saturates", lambda: saturates)
    assert overflow.weight_bits(8, "auto") == (7 if saturates else 8)
    assert overflow.weight_bits(8, "on") == 7 and overflow.weight_bits(8, "off") == 8
    assert overflow.weight_bits(6, "on") == 6  # narrower weights cannot overflow
    assert (overflow.overflow_note(8, "auto") is not None) == saturates


def test_ptq_overflow_fix_on_keeps_codes_within_63_and_runs_alike_everywhere(data, tmp_path):
    ctx = StageContext(data=data)
    q = quantize_ptq(_net(), parse_config("quantize", {"method": "ptq",
                                                       "weights": {"overflow_fix": "on"}}), ctx)
    assert max(_codes(q)) == 63  # min-max scales: each layer's largest weight maps to 63
    assert ctx.report["ptq"]["weight_bits"] == 7 and "7-bit codes" in ctx.report["ptq"][
        "overflow_fix"]
    full = quantize_ptq(_net(), parse_config("quantize", {"method": "ptq",
                                                          "weights": {"overflow_fix": "off"}}),
                        StageContext(data=data))
    assert max(_codes(full)) == 127
    x = data[0].inputs[0]
    with torch.no_grad():
        ref, got, got_full = _net()(x), q(x), full(x)
    rel, rel_full = (float((g - ref).norm() / ref.norm()) for g in (got, got_full))
    assert rel < 0.05 and rel_full <= rel  # 7-bit weights: a little more error (~0.01 here)
    path = export_qdq_onnx(q, data[0].slice(1), tmp_path / "q.onnx")
    from netpress.export.openvino import OpenVinoRunner

    for runner in (OnnxRunner(path, threads=1), OpenVinoRunner(path, threads=1)):
        out = runner.run(data[0])  # no pair of products can saturate int16 now, on any CPU
        assert float(np.abs(out - got.numpy()).max()) < 0.02 * float(got.abs().max())  # 0.3 %


def test_smoothquant_and_qat_take_the_fix(data):
    from test_smooth import _data
    from test_smooth import _net as _block

    sq = quantize(_block(), {"method": "smoothquant", "weights": {"overflow_fix": "on"}},
                  data=_data())
    assert max(int(m.qweight.abs().max()) for m in sq.modules() if hasattr(m, "smooth")) == 63
    ctx = StageContext(data=data)
    cfg = parse_config("quantize", {"method": "qat", "weights": {"bits": 8, "overflow_fix": "on"},
                                    "finetune": {"epochs": 0}})
    from netpress.quantize.qat import quantize_qat

    quantize_qat(_net(), cfg, ctx)
    assert ctx.report["qat"]["weights_bits"] == 7
    assert {v["bits"] for v in ctx.report["qat"]["layers"].values()} == {7}


def test_bad_overflow_fix_is_a_recipe_error():
    with pytest.raises(RecipeError, match="overflow_fix"):
        parse_config("quantize", {"method": "ptq", "weights": {"overflow_fix": "maybe"}})


@pytest.mark.parametrize("saturates", [True, False])
def test_onnxruntime_uses_exact_int8_kernels_where_they_saturate(monkeypatch, tmp_path, data,
                                                                  saturates):
    import netpress.export.onnx as xo

    monkeypatch.setattr(xo, "u8s8_saturates", lambda: saturates)
    q = quantize_ptq(_net(), parse_config("quantize", {"method": "ptq"}), StageContext(data=data))
    sess = make_session(export_qdq_onnx(q, data[0].slice(1), tmp_path / "q.onnx"))
    try:
        entry = sess.get_session_options().get_session_config_entry("session.x64quantprecision")
    except RuntimeError:  # ORT: no such entry
        entry = None
    assert entry == ("1" if saturates else None)
