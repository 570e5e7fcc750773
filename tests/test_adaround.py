"""AdaRound for PTQ (``rounding: adaround``): reconstruction error vs round-to-nearest, export and
reload of the learned integer codes."""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from netpress.api import quantize
from netpress.core.config import StageContext, parse_config
from netpress.core.data import Batch
from netpress.export.onnx import OnnxRunner
from netpress.nn.ptq import W8A8Conv2d, W8A8Linear, fake_quant
from netpress.quantize.adaround import adaround
from netpress.quantize.ptq import quantize_ptq
from netpress.quantize.qdq_onnx import export_qdq_onnx


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),
                         nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 2 * 2, 5)).eval()


def _data(seed: int, n: int = 4) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch((torch.randn(16, 3, 8, 8, generator=g),)) for _ in range(n)]


def _layer_error(q: nn.Module, f: nn.Module, x: torch.Tensor,
                 codes: nn.Module) -> dict[str, float]:
    """Per-layer squared output error ``‖W x_f - W~ x_q‖²`` on ``x``: inputs from the float model
    ``f`` and the quantized model ``q``, weights ``W~`` from the same layer of ``codes``."""
    qm, fm, cm = dict(q.named_modules()), dict(f.named_modules()), dict(codes.named_modules())
    got: dict[str, torch.Tensor] = {}
    want: dict[str, torch.Tensor] = {}
    hooks = []
    for n, m in qm.items():
        if isinstance(m, (W8A8Conv2d, W8A8Linear)):
            def qh(mod, a, n=n):
                lo, hi = mod.act_qrange
                xq = fake_quant(a[0], mod.input_scale, mod.input_zero_point, lo, hi)
                got[n] = mod._op(xq, cm[n].dequantized_weight())
            hooks.append(m.register_forward_pre_hook(qh))
            hooks.append(fm[n].register_forward_pre_hook(
                lambda mod, a, n=n: want.__setitem__(n, mod._conv_forward(a[0], mod.weight, None)
                                                     if isinstance(mod, nn.Conv2d)
                                                     else a[0] @ mod.weight.T)))
    with torch.no_grad():
        q(x)
        f(x)
    for h in hooks:
        h.remove()
    return {n: float(((got[n] - want[n]) ** 2).sum()) for n in got}


def test_adaround_lowers_reconstruction_error_vs_nearest():
    """4-bit weights (where rounding matters most): every layer's output error on the calibration
    inputs falls below round-to-nearest's, and the network output moves closer to fp32 on
    held-out inputs."""
    cfg = {"method": "ptq", "weights": {"bits": 4}}
    cal, held = _data(1), _data(2)
    rtn = quantize(_net(), cfg, data=cal)
    ctx = StageContext(data=cal)
    ada = quantize_ptq(_net(), parse_config("quantize", {**cfg, "rounding": "adaround",
                                                         "adaround": {"iters": 300}}), ctx)
    rep = ctx.report["ptq"]["adaround"]
    assert sorted(rep["layers"]) == ["0", "2", "4", "7"] and rep["seconds"] >= 0
    x = torch.cat([b.inputs[0] for b in cal])
    # the objective: inputs from the round-to-nearest model, as AdaRound's statistics
    e_rtn, e_ada = _layer_error(rtn, _net(), x, rtn), _layer_error(rtn, _net(), x, ada)
    for n in e_rtn:
        assert e_ada[n] < e_rtn[n], (n, e_ada[n], e_rtn[n])
        assert rep["layers"][n]["error_vs_nearest"] < 1.0
    assert int(ada[0].qweight.abs().max()) <= 7  # still 4-bit codes
    flipped = sum(int((a.qweight != r.qweight).sum()) for a, r in zip(
        ada.modules(), rtn.modules(), strict=True) if isinstance(a, (W8A8Conv2d, W8A8Linear)))
    assert flipped > 0
    xh = torch.cat([b.inputs[0] for b in held])
    with torch.no_grad():
        ref = _net()(xh)
        err_rtn, err_ada = float((rtn(xh) - ref).norm()), float((ada(xh) - ref).norm())
    assert err_ada < err_rtn  # measured 0.033 vs 0.038 relative to the fp32 output norm


def test_adaround_codes_exported_and_reloaded(tmp_path):
    from netpress.api import load
    from netpress.export.artifact import save_artifact

    cal = _data(3)
    q = quantize(_net(), {"method": "ptq", "rounding": "adaround",
                          "adaround": {"iters": 50, "correct_bias": True}}, data=cal)
    # the ONNX file carries the learned int8 codes themselves
    path = export_qdq_onnx(q, cal[0].slice(1), tmp_path / "q.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    codes = [v for k, v in inits.items() if k.endswith("_quantized") and v.dtype == np.int8]
    assert any(np.array_equal(c, q[2].qweight.numpy()) for c in codes)
    out = OnnxRunner(path, threads=1).run(cal[1])
    with torch.no_grad():
        got = q(cal[1].inputs[0]).numpy()
    assert float(np.abs(out - got).max()) < 0.05 * float(np.abs(got).max())
    save_artifact(q, tmp_path / "art", source={"kind": "module", "factory": f"{__name__}:_net"},
                  recipe={}, metrics=None)
    back = load(tmp_path / "art")
    assert torch.equal(back[2].qweight, q[2].qweight)
    with torch.no_grad():
        assert torch.equal(back(cal[1].inputs[0]), q(cal[1].inputs[0]))


def test_adaround_direct_api_reports_every_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    q = nn.Sequential(W8A8Conv2d.from_float(conv, 6 / 255, 128))
    before = q[0].qweight.clone()
    rep = adaround(nn.Sequential(conv), q, torch.randn(8, 4, 6, 6), iters=100)
    assert list(rep) == ["0"] and 0 <= rep["0"]["flipped"] <= 1
    diff = (q[0].qweight.int() - before.int()).abs()
    assert int(diff.max()) <= 1  # only floor or ceil of the float code
