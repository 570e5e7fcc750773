"""Q1 uniform affine quantization (qscheme) and the int8_weight technique (QuantLinear/QuantConv)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from netpress.api import quantize as apply_quantize
from netpress.core.config import StageContext, parse_config
from netpress.core.errors import ModelError, RecipeError
from netpress.export.artifact import save_artifact
from netpress.nn import QuantConv1d, QuantConv2d, QuantLinear, build_module, module_spec
from netpress.quantize.qscheme import (
    QScheme,
    compute_qparams,
    dequantize,
    expand,
    quantize,
    sqnr_db,
)
from netpress.quantize.weight import WeightQuantConfig, quantize_int8_weight


# ------------------------------------------------------------------------------------- fixtures
class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, groups=2)
        self.seq = nn.Conv1d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 9, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 10)
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))  # (B, 16, 3, 3)
        h = torch.relu(self.seq(h.flatten(2)))  # (B, 8, 9)
        return self.fc(h.flatten(1))


def big_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


@pytest.fixture
def cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


# -------------------------------------------------------------------------------------- qscheme
def test_int8_per_channel_sqnr_on_random_weight() -> None:
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    scheme = QScheme(bits=8, symmetric=True, granularity="per_channel")
    scale, zp = compute_qparams(w, scheme, "fc")
    codes = quantize(w, scale, zp, scheme)
    assert codes.dtype == torch.int8 and scale.shape == (64,) and scale.dtype == torch.float32
    w_hat = dequantize(codes, scale, zp, scheme)
    assert w_hat.dtype == torch.float32
    # measured: 44.2 dB per channel, 40.5 dB per tensor (seed 0)
    assert sqnr_db(w, w_hat) > 40.0
    per_tensor = QScheme(bits=8, granularity="per_tensor")
    s_t, z_t = compute_qparams(w, per_tensor)
    assert sqnr_db(w, dequantize(quantize(w, s_t, z_t, per_tensor), s_t, z_t)) < sqnr_db(w, w_hat)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_round_trip_error_is_at_most_half_a_step(bits: int, symmetric: bool,
                                                 granularity: str) -> None:
    x = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(bits)) * 3 + 0.5
    scheme = QScheme(bits=bits, symmetric=symmetric, granularity=granularity,
                     group_size=12 if granularity == "per_group" else None)
    scale, zp = compute_qparams(x, scheme, "conv")
    codes = quantize(x, scale, zp, scheme)
    assert not codes.is_floating_point()
    assert int(codes.min()) >= scheme.qmin and int(codes.max()) <= scheme.qmax
    x_hat = dequantize(codes, scale, zp, scheme)
    step = expand(scale, x, scheme)
    assert bool(((x - x_hat).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all())
    if granularity == "per_group":
        assert tuple(scale.shape) == (8, 3)  # 36 values per channel, groups of 12
    # the shape is inferred from the scale when no scheme is given
    assert torch.equal(dequantize(codes, scale, zp), x_hat)


def test_fixed_point_form_keeps_code_and_value_apart() -> None:
    scheme = QScheme(bits=16, symmetric=True, granularity="per_tensor")
    codes = quantize(torch.tensor([0.75]), torch.tensor(0.001), torch.tensor(0), scheme)
    assert codes.dtype == torch.int16 and codes.tolist() == [750]  # the integer code
    value = dequantize(codes, torch.tensor(0.001), torch.tensor(0))
    assert value.dtype == torch.float32 and math.isclose(value.item(), 0.75, rel_tol=1e-6)


def test_asymmetric_zero_point_maps_range_and_keeps_zero_exact() -> None:
    scheme = QScheme(bits=8, symmetric=False, granularity="per_channel")
    x = torch.tensor([[-1.0, 0.0, 3.0], [0.5, 2.0, 1.0], [-3.0, -1.0, 0.0]])
    scale, zp = compute_qparams(x, scheme)
    # row 0: range [-1, 3] -> 255 steps, z = round(-128 + 1/s) = -64
    assert math.isclose(scale[0].item(), 4 / 255, rel_tol=1e-6) and zp[0].item() == -64
    # row 1: all positive -> range [0, 2], 0.0 sits at qmin; row 2: all negative -> 0.0 at qmax
    assert zp[1].item() == -128 and zp[2].item() == 127
    codes = quantize(x, scale, zp, scheme)
    assert codes[0].tolist()[0] == -128 and codes[0].tolist()[2] == 127
    x_hat = dequantize(codes, scale, zp, scheme)
    assert x_hat[0, 1].item() == 0.0 and x_hat[2, 2].item() == 0.0  # zero is exact
    unsigned = QScheme(bits=8, symmetric=False, signed=False)
    s_u, z_u = compute_qparams(torch.tensor([-1.0, 3.0]), unsigned)
    assert z_u.item() == 64 and quantize(torch.tensor([-1.0, 3.0]), s_u, z_u, unsigned).tolist() \
        == [0, 255]


def test_all_zero_channel_gets_unit_scale() -> None:
    x = torch.zeros(2, 4)
    x[1] = 1.0
    scale, zp = compute_qparams(x, QScheme(granularity="per_channel"))
    assert scale[0].item() == 1.0 and zp.tolist() == [0, 0]


@pytest.mark.parametrize("bits", [1, 17, 0, True])
def test_bits_out_of_range_is_a_recipe_error(bits: int) -> None:
    with pytest.raises(RecipeError, match="bits"):
        QScheme(bits=bits)


def test_group_size_must_divide_the_row_and_names_the_layer() -> None:
    scheme = QScheme(bits=4, granularity="per_group", group_size=48)
    with pytest.raises(RecipeError, match=r"blocks\.3\.fc.*group_size 48.*divides 64") as err:
        compute_qparams(torch.randn(8, 64), scheme, where="blocks.3.fc")
    assert "use group_size 64 or 32 or 16" in str(err.value)
    with pytest.raises(RecipeError, match="group_size"):
        QScheme(granularity="per_group")
    with pytest.raises(RecipeError, match="group_size"):
        QScheme(granularity="per_channel", group_size=32)
    with pytest.raises(RecipeError, match="granularity"):
        QScheme(granularity="per_row")


def test_nan_weight_is_a_model_error_naming_the_layer() -> None:
    w = torch.randn(4, 4)
    w[1, 2] = float("nan")
    with pytest.raises(ModelError, match=r"encoder\.fc1.*1 NaN/Inf"):
        compute_qparams(w, QScheme(), where="encoder.fc1")


# ---------------------------------------------------------------------------------- int8_weight
def test_int8_weight_swaps_modules_and_stays_close(cnn: TinyCNN, images: torch.Tensor) -> None:
    ctx = StageContext()
    ref = cnn(images).detach()
    q = quantize_int8_weight(cnn, WeightQuantConfig(), ctx)
    assert q is cnn  # in place; the API / pipeline pass a copy they own
    assert (type(q.conv1), type(q.conv2), type(q.seq), type(q.fc)) == (
        QuantConv2d, QuantConv2d, QuantConv1d, QuantLinear)
    assert set(q.fc.state_dict()) == {"qweight", "scale", "zero_point", "bias"}
    assert q.conv2.qweight.dtype == torch.int8 and tuple(q.conv2.qweight.shape) == (16, 4, 3, 3)
    with torch.no_grad():
        err = rel_error(q(images), ref)
    assert err < 0.01  # measured 0.0041
    assert ctx.report["int8_weight"]["quantized"] == ["conv1", "conv2", "seq", "fc"]
    assert ctx.report["int8_weight"]["kept_float"] == []


@pytest.mark.parametrize("cfg,bound", [({"granularity": "per_tensor"}, 0.02),
                                       ({"symmetric": False}, 0.01), ({"bits": 4}, 0.15)])
def test_int8_weight_variants(cfg: dict, bound: float, cnn: TinyCNN,
                              images: torch.Tensor) -> None:
    q = apply_quantize(cnn, {"method": "int8_weight", **cfg})
    with torch.no_grad():
        err = rel_error(q(images), cnn(images))
    # measured: per_tensor 0.0042, asymmetric 0.0036, 4-bit 0.072
    assert err < bound
    if not cfg.get("symmetric", True):
        assert bool((q.fc.zero_point != 0).any())
    if cfg.get("granularity") == "per_tensor":
        assert q.fc.scale.shape == ()


def test_ignore_targets_and_unsupported_modules(cnn: TinyCNN) -> None:
    ctx = StageContext()
    q = quantize_int8_weight(cnn, WeightQuantConfig(ignore=["re:conv.*"]), ctx)
    assert type(q.conv1) is nn.Conv2d and type(q.fc) is QuantLinear and type(q.seq) is QuantConv1d
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(2),
                          nn.Linear(3, 3))
    ctx = StageContext()
    q = quantize_int8_weight(model, WeightQuantConfig(targets=["Conv2d", "BatchNorm2d", "2"]), ctx)
    assert [type(m).__name__ for m in q] == ["Conv2d", "BatchNorm2d", "QuantLinear"]
    kept = {k["name"]: k["reason"] for k in ctx.report["int8_weight"]["kept_float"]}
    assert "reflect" in kept["0"] and "no int8-weight version" in kept["1"]
    with pytest.raises(RecipeError, match="targets"):
        quantize_int8_weight(nn.Sequential(nn.ReLU()), WeightQuantConfig(), StageContext())


def test_config_validation() -> None:
    for bad in ({"bits": 17}, {"bits": 1}, {"granularity": "per_group"}, {"bit": 8},
                {"bits": "8"}):
        with pytest.raises(RecipeError):
            parse_config("quantize", {"method": "int8_weight", **bad})
    cfg = parse_config("quantize", {"method": "int8_weight", "bits": 4})
    assert WeightQuantConfig.from_dict(cfg.to_dict()) == cfg


def test_nan_weight_raises_model_error_naming_layer(cnn: TinyCNN) -> None:
    with torch.no_grad():
        cnn.conv2.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ModelError, match="conv2"):
        apply_quantize(cnn, {"method": "int8_weight"})


def test_eval_cache_follows_the_codes_and_never_enters_the_state_dict() -> None:
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    y1 = q(x)
    assert q._cache is not None and "_cache" not in q.state_dict()
    with torch.no_grad():
        q.qweight.zero_()
    assert torch.allclose(q(x), q.bias.expand(3, 4))  # cache invalidated by the in-place edit
    q.train()
    assert q(x).requires_grad and q._cache is None
    assert not torch.equal(y1, q(x))


def test_spec_round_trip_rebuilds_equal_module(cnn: TinyCNN, images: torch.Tensor) -> None:
    q = apply_quantize(cnn, {"method": "int8_weight", "symmetric": False})
    for name in ("conv2", "seq", "fc"):
        mod = getattr(q, name)
        rebuilt = build_module(module_spec(mod))
        assert module_spec(rebuilt) == module_spec(mod)
        rebuilt.load_state_dict(mod.state_dict(), strict=True)
        setattr(q, name, rebuilt.eval())
    with torch.no_grad():
        assert torch.equal(q(images), apply_quantize(cnn, {"method": "int8_weight",
                                                           "symmetric": False})(images))


def test_int8_weights_take_a_quarter_of_the_fp32_bytes(tmp_path) -> None:
    model = big_mlp().eval()
    source = {"kind": "module", "factory": f"{__name__}:big_mlp"}
    dense = save_artifact(model, tmp_path / "fp32", source=source, recipe={})
    q = apply_quantize(model, {"method": "int8_weight"})
    quant = save_artifact(q, tmp_path / "int8", source=source, recipe={})
    b32 = dense["files"]["model.safetensors"]["bytes"]
    b8 = quant["files"]["model.safetensors"]["bytes"]
    # measured: 537,056 -> 138,986 bytes (0.259: int8 codes + fp32 biases/scales + header)
    assert 0.24 < b8 / b32 < 0.27
    assert quant["tensors"]["0.qweight"] == {"dtype": "int8", "shape": [256, 256],
                                             "encoding": "dense"}


@pytest.mark.parametrize("cfg", [{}, {"granularity": "per_tensor", "symmetric": False}])
def test_onnx_export_runs_in_onnxruntime_and_matches_torch(cfg: dict, cnn: TinyCNN,
                                                           images: torch.Tensor,
                                                           tmp_path) -> None:
    q = apply_quantize(cnn, {"method": "int8_weight", **cfg})
    path = tmp_path / "q.onnx"
    torch.onnx.export(q, (images[:2],), str(path), dynamo=True, input_names=["x"],
                      dynamic_shapes=({0: "batch"},), verbose=False)
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node].count("DequantizeLinear") == 4
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and
            len(i.dims) >= 2]
    assert len(int8) == 4  # the weights stay int8 in the ONNX file
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": images.numpy()})[0]
    with torch.no_grad():
        ref = q(images).numpy()
    assert np.abs(out - ref).max() < 1e-5  # measured ~1.5e-7


def test_9_to_16_bit_codes_are_int16_in_the_state_dict_the_onnx_file_and_the_artifact(
        tmp_path) -> None:
    """Q1's full 2..16-bit range from a recipe: int16 storage above 8 bits."""
    from netpress.core.data import Batch
    from netpress.export.artifact import load
    from netpress.export.onnx import export_onnx, verify_onnx

    model = big_mlp().eval()
    x = torch.randn(4, model[0].in_features)
    errs = {}
    for bits in (8, 12, 16):
        q = apply_quantize(model, {"method": "int8_weight", "bits": bits})
        assert q[0].qweight.dtype == (torch.int8 if bits == 8 else torch.int16)
        with torch.no_grad():
            errs[bits] = float((q(x) - model(x)).abs().max())
    assert errs[16] < errs[12] / 8 < errs[8] / 64  # each 4 bits: 16x smaller steps
    path = export_onnx(q, Batch((x[:1],)), tmp_path / "q16.onnx")
    types = {t.data_type for t in onnx.load(str(path)).graph.initializer}
    assert onnx.TensorProto.INT16 in types  # the codes stay integer in the file
    assert verify_onnx(q, path, [Batch((x,))]) < 1e-4
    source = {"kind": "module", "factory": f"{__name__}:big_mlp"}
    save_artifact(q, tmp_path / "a", source=source, recipe={})
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "a")(x), q(x))
