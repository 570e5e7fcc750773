"""Static PTQ calibration paths (torch hooks vs ONNX Runtime) and empirical bias correction."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from netpress.core.config import StageContext, parse_config
from netpress.core.data import Batch
from netpress.core.errors import RecipeError
from netpress.nn.ptq import W8A8Conv2d, W8A8Linear
from netpress.quantize.bias_correction import bias_correct, float_output_means
from netpress.quantize.fold import fold_batchnorm
from netpress.quantize.ptq import quantize_ptq


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c),
                                  nn.ReLU6(), nn.Conv2d(2 * c, 2 * c, 3, padding=1,
                                                        groups=2 * c, bias=False),
                                  nn.BatchNorm2d(2 * c), nn.ReLU6(),
                                  nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), Block(8),
                        Block(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture
def data():
    torch.manual_seed(1)
    return [Batch((torch.randn(16, 3, 12, 12),)) for _ in range(3)]


def _qparams(q: nn.Module) -> dict[str, tuple[float, int]]:
    out = {}
    for n, m in q.named_modules():
        if isinstance(m, (W8A8Conv2d, W8A8Linear)):
            out[n] = (float(m.input_scale), int(m.input_zero_point))
            if m.quantize_output:
                out[n + ":out"] = (float(m.output_scale), int(m.output_zero_point))
    return out


@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_torch_calibration_matches_onnxruntime(data, observer):
    """Both calibration runtimes observe the same float tensors: the same qparams."""
    got = {}
    for runtime in ("torch", "onnxruntime"):
        cfg = parse_config("quantize", {"method": "ptq", "calibration_runtime": runtime,
                                        "activations": {"observer": observer}})
        ctx = StageContext(data=data)
        got[runtime] = _qparams(quantize_ptq(_net(), cfg, ctx))
        assert ctx.report["ptq"]["calibration_runtime"] == runtime
    assert got["torch"].keys() == got["onnxruntime"].keys()
    assert len(got["torch"]) == 10  # 7 conv inputs, the fc input, 2 residual outputs
    for k, (s, z) in got["torch"].items():
        s2, z2 = got["onnxruntime"][k]
        assert abs(s - s2) <= 1e-4 * s2 and abs(z - z2) <= 1, k  # float32 ORT vs torch kernels


def test_bias_correction_removes_channel_mean_error(data):
    """After correction each conv's per-channel output mean matches the float model's (in the
    single-batch sequential pass), and the end-to-end error does not grow."""
    float_net = _net()
    fold_batchnorm(float_net)
    plain = quantize_ptq(_net(), parse_config("quantize", {"method": "ptq"}), StageContext(data=data))
    cfg = parse_config("quantize", {"method": "ptq", "bias_correction": True,
                                    "bias_correction_examples": 32,
                                    "bias_correction_mode": "output_mean"})
    ctx = StageContext(data=data)
    corrected = quantize_ptq(_net(), cfg, ctx)
    shifts = ctx.report["ptq"]["bias_correction"]
    convs = [n for n, m in corrected.named_modules() if isinstance(m, W8A8Conv2d)]
    assert sorted(shifts) == sorted(convs) and max(shifts.values()) > 0  # linears untouched
    x = torch.cat([b.inputs[0] for b in data[:2]])  # the correction set
    names = convs
    target = float_output_means(float_net, names, x)
    worst = {}
    for key, model in (("corrected", corrected), ("plain", plain)):
        means = float_output_means(_accumulating(model), names, x)
        worst[key] = max(float((means[n] - target[n]).abs().max()) for n in names)
    # measured: corrected 6e-4 (only behind the quantized residual output), plain 2.2e-3
    assert worst["corrected"] < 1e-3 and worst["plain"] > 3 * worst["corrected"]
    held_out = data[2].inputs[0]
    with torch.no_grad():
        ref = float_net(held_out)
        e_plain = float((plain(held_out) - ref).pow(2).mean())
        e_corr = float((corrected(held_out) - ref).pow(2).mean())
    assert e_corr <= 1.1 * e_plain  # measured 1.03x on this toy net (tiny weight error)


def _accumulating(model: nn.Module) -> nn.Module:
    """A copy whose W8A8 convs output their accumulator (no output quantizer) for inspection."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, W8A8Conv2d):
            m.forward = m.accumulate  # type: ignore[method-assign]
    return model


def test_bias_correct_direct_linear_opt_in():
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    q = nn.Sequential(W8A8Linear.from_float(lin, 0.05, 128))
    x = torch.randn(64, 16)
    assert bias_correct(nn.Sequential(lin), q, x) == {}  # linears are opt-in
    shifts = bias_correct(nn.Sequential(lin), q, x, include_linear=True)
    assert list(shifts) == ["0"]
    with torch.no_grad():
        assert float((q(x) - lin(x)).mean(0).abs().max()) < 1e-5


def test_bad_bias_correction_config():
    with pytest.raises(RecipeError):
        parse_config("quantize", {"method": "ptq", "bias_correction_examples": 0})
    with pytest.raises(RecipeError):
        parse_config("quantize", {"method": "ptq", "calibration_runtime": "tensorrt"})


def test_weight_error_bias_correction_zeroes_mean_weight_error():
    """DFQ mode: on the correction inputs, E[W_q x_q] + shift == E[W x_q] per channel."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.1, 20, 6).reshape(6, 1, 1, 1))  # wide channel ranges
    q = nn.Sequential(W8A8Conv2d.from_float(conv, 0.03, 128, per_channel=False))
    x = torch.randn(32, 6, 8, 8) + 1.0
    before = q[0].bias.detach().clone()
    shifts = bias_correct(nn.Sequential(conv), q, x, mode="weight_error")
    assert list(shifts) == ["0"] and shifts["0"] > 1e-3  # per-tensor weights: a real bias
    lo, hi = q[0].act_qrange
    from netpress.nn.ptq import fake_quant

    with torch.no_grad():
        xq = fake_quant(x, q[0].input_scale, q[0].input_zero_point, lo, hi)
        err = (q[0]._op(xq, conv.weight) - q[0]._op(xq, q[0].dequantized_weight())).mean((0, 2, 3))
        assert torch.allclose(q[0].bias - before, err, atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        bias_correct(nn.Sequential(conv), q, x, mode="other")
