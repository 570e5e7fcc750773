"""measure/: parameter and non-zero counts, MACs, sizes, latency and task metrics."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune

from netpress.core.data import Batch
from netpress.core.errors import ArtifactError, DataError, ModelError, RecipeError
from netpress.measure import (
    METRICS,
    collect_outputs,
    compute_metric,
    confident_agreement,
    count_macs,
    count_nonzero,
    count_params,
    file_bytes,
    first_tensor,
    latency_torch,
    macs_by_layer,
    state_dict_bytes,
)
from netpress.measure.count import is_weight_buffer


# ------------------------------------------------------------------------------------- fixtures
class SmallConvNet(nn.Module):
    """conv(3->8, 3x3) -> BN -> ReLU -> depthwise conv(8, 3x3, pad 1) -> GAP -> Linear(8, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 10, 10) -> (B, 4)
        h = torch.relu(self.bn(self.conv(x)))  # (B, 8, 8, 8)
        h = self.dw(h).mean(dim=(2, 3))  # (B, 8)
        return self.fc(h)


class TinyAttention(nn.Module):
    """Embedding + one multi-head self-attention block with a padding mask: (B, T) -> (B, T, H)."""

    def __init__(self, vocab: int = 20, hidden: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # (B, T, H)
        b, t, h = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, h // self.heads)  # (B, T, 3, nh, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, d)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, T, d)
        return self.out(y.transpose(1, 2).reshape(b, t, h))  # (B, T, H)


class Int8Linear(nn.Module):
    """Weight-only int8 Linear: int8 codes in a buffer, dequantized, then F.linear."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        scale = lin.weight.detach().abs().amax(1, keepdim=True) / 127  # (O, 1)
        self.register_buffer("qweight", torch.round(lin.weight.detach() / scale).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.bias = nn.Parameter(lin.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.float() * self.weight_scale, self.bias)


class Int8Conv(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        scale = conv.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / 127  # (O, 1, 1, 1)
        self.register_buffer("qweight", torch.round(conv.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.qweight.float() * self.scale)


@pytest.fixture
def conv_net() -> SmallConvNet:
    torch.manual_seed(0)
    return SmallConvNet().eval()


@pytest.fixture
def tokens() -> Batch:
    ids = torch.tensor([[1, 2, 3, 4, 5]])  # (1, 5)
    return Batch({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0]])})


# ---------------------------------------------------------------------------------------- counts
def test_count_params_linear_is_weights_plus_bias():
    assert count_params(nn.Linear(4, 3)) == 15


def test_count_params_conv_net_by_hand(conv_net):
    # conv 8*3*3*3 + 8, BN gamma+beta 16 (running stats are not weights), dw 8*9, fc 8*4 + 4
    assert count_params(conv_net) == 216 + 8 + 16 + 72 + 36


def test_count_nonzero_after_zeroing():
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.fill_(1.0)
        lin.weight[:, :2] = 0.0  # 6 zeros
    assert count_params(lin) == 15
    assert count_nonzero(lin) == 9


def test_shared_parameters_are_counted_once():
    lin = nn.Linear(4, 4, bias=False)
    net = nn.Sequential(lin, nn.ReLU(), lin)
    assert count_params(net) == 16


def test_int8_weight_buffers_count_but_scales_do_not():
    torch.manual_seed(0)
    q = Int8Linear(nn.Linear(4, 3))
    assert count_params(q) == 15  # 12 int8 codes + 3 biases; weight_scale is metadata
    with torch.no_grad():
        q.qweight[0] = 0
    assert count_nonzero(q) == 15 - 4
    assert is_weight_buffer("qweight") and is_weight_buffer("weight_packed")
    assert not is_weight_buffer("weight_scale") and not is_weight_buffer("weight_zero_point")
    assert not is_weight_buffer("running_mean") and not is_weight_buffer("weight_mask")


def test_torch_prune_reparametrisation_counts_masked_weights():
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1.0, 13.0).reshape(3, 4))
        lin.bias.fill_(1.0)
    prune.l1_unstructured(lin, "weight", amount=0.5)  # 6 of 12 weights masked
    assert count_params(lin) == 15
    assert count_nonzero(lin) == 6 + 3


def test_module_can_report_logical_weight_counts():
    class Packed4(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("packed_weight", torch.zeros(6, dtype=torch.uint8))  # 12 int4

        def netpress_weight_counts(self) -> tuple[int, int]:
            return 12, 7

    net = nn.Sequential(Packed4(), nn.Linear(2, 2))
    assert count_params(net) == 12 + 6
    assert count_nonzero(net) == 7 + int(torch.count_nonzero(net[1].weight)) + int(
        torch.count_nonzero(net[1].bias)
    )


# ------------------------------------------------------------------------------------------ MACs
def test_macs_conv_by_hand():
    conv = nn.Conv2d(3, 8, 3)
    # 8 output channels * 8x8 output pixels * (3*3*3) kernel taps
    assert count_macs(conv, Batch((torch.zeros(1, 3, 10, 10),))) == 8 * 8 * 8 * 27 == 13824


def test_macs_linear_scale_with_batch():
    lin = nn.Linear(4, 3)
    assert count_macs(lin, Batch((torch.zeros(1, 4),))) == 12
    assert count_macs(lin, Batch((torch.zeros(5, 4),))) == 60


def test_macs_conv_net_and_by_layer(conv_net):
    example = Batch((torch.zeros(1, 3, 10, 10),))
    # conv 13824 + depthwise 8 ch * 8x8 * 9 taps = 4608 + fc 32
    assert count_macs(conv_net, example) == 13824 + 4608 + 32
    assert macs_by_layer(conv_net, example) == {"conv": 13824, "dw": 4608, "fc": 32}


def test_macs_attention_counts_sdpa(tokens):
    torch.manual_seed(0)
    model = TinyAttention().eval()
    # qkv 5*8*24 = 960, out 5*8*8 = 320, attention 2 heads * 5*5 * (4 + 4) = 400
    assert count_macs(model, tokens) == 960 + 320 + 400
    layers = macs_by_layer(model, tokens)
    assert layers == {"": 400, "qkv": 960, "out": 320}
    assert sum(layers.values()) == count_macs(model, tokens)


def test_macs_explicit_matmul_attention_matches_sdpa():
    class Manual(nn.Module):
        def forward(self, q, k, v):  # each (B, nh, T, d)
            attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # (B, nh, T, T)
            return attn @ v

    q = torch.randn(1, 2, 5, 4)
    manual = count_macs(Manual(), Batch((q, q, q)))
    sdpa = count_macs(_Fn(F.scaled_dot_product_attention), Batch((q, q, q)))
    assert manual == sdpa == 400


class _Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def test_macs_of_dequantizing_modules_match_float():
    torch.manual_seed(0)
    lin, conv = nn.Linear(16, 8), nn.Conv2d(3, 8, 3, bias=False)
    x, img = Batch((torch.randn(2, 16),)), Batch((torch.randn(1, 3, 10, 10),))
    assert count_macs(Int8Linear(lin), x) == count_macs(lin, x) == 2 * 16 * 8
    assert count_macs(Int8Conv(conv), img) == count_macs(conv, img) == 13824


def test_macs_hf_bert_wrapper():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask)

    b, t, h, i = 2, 16, 32, 64
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 10:] = 0
    batch = Batch({"input_ids": torch.randint(0, 100, (b, t)), "attention_mask": mask})
    linear = 2 * b * t * (4 * h * h + 2 * h * i) + b * h * h  # 2 layers + pooler
    attention = 2 * b * t * t * 2 * h  # per layer: QK^T and AV over all heads
    assert count_macs(Wrapper(), batch) == linear + attention == 591872


def test_macs_restore_training_flag_and_errors(conv_net):
    conv_net.train()
    count_macs(conv_net, Batch((torch.zeros(1, 3, 10, 10),)))
    assert conv_net.training and conv_net.bn.training
    with pytest.raises(ModelError, match="Batch"):
        count_macs(conv_net, torch.zeros(1, 3, 10, 10))  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="forward"):
        count_macs(conv_net, Batch((torch.zeros(1, 5, 10, 10),)))


# ------------------------------------------------------------------------------------------ size
def test_file_bytes_file_and_directory(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 23)
    assert file_bytes(tmp_path / "a.bin") == 100
    assert file_bytes(tmp_path) == 123
    with pytest.raises(ArtifactError, match="missing"):
        file_bytes(tmp_path / "nope")


def test_state_dict_bytes():
    assert state_dict_bytes(nn.Linear(4, 3)) == 60
    bn = nn.BatchNorm1d(4)  # weight, bias, running mean/var fp32 (64) + num_batches_tracked int64
    assert state_dict_bytes(bn) == 64 + 8
    lin = nn.Linear(4, 4, bias=False)
    assert state_dict_bytes(nn.Sequential(lin, lin)) == 64  # tied: counted once


# --------------------------------------------------------------------------------------- latency
def test_latency_torch_fields(conv_net):
    threads_before = torch.get_num_threads()
    res = latency_torch(conv_net, Batch((torch.randn(3, 3, 10, 10),)), threads=1, warmup=2, runs=5)
    assert (res.runtime, res.threads, res.batch, res.runs) == ("torch", 1, 3, 5)
    assert 0 < res.median_ms <= res.p90_ms and res.mean_ms > 0
    assert torch.get_num_threads() == threads_before
    assert set(res.to_dict()) == {"median_ms", "p90_ms", "mean_ms", "runs", "runtime", "threads", "batch"}


def test_latency_time_cap_stops_slow_models_after_min_runs():
    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.02)
            return x

    start = time.perf_counter()
    res = latency_torch(Slow(), Batch((torch.zeros(1),)), warmup=5, runs=100, max_seconds=0.05)
    assert res.runs == 3  # the minimum, not 100
    assert res.median_ms >= 20.0
    assert time.perf_counter() - start < 1.0


def test_latency_bad_arguments():
    lin, batch = nn.Linear(2, 2), Batch((torch.zeros(1, 2),))
    with pytest.raises(RecipeError, match="threads"):
        latency_torch(lin, batch, threads=0)
    with pytest.raises(RecipeError, match="runs"):
        latency_torch(lin, batch, runs=0)


# --------------------------------------------------------------------------------------- metrics
def _batches(n: int, targets: list[int] | None = None, mask: torch.Tensor | None = None):
    if mask is not None:
        return [Batch({"input_ids": torch.zeros_like(mask), "attention_mask": mask})]
    target = None if targets is None else torch.tensor(targets)
    return [Batch((torch.zeros(n, 1),), target)]


def test_accuracy_exact():
    out = [torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([[1.0, 0.0]])]
    batches = [_batches(3, [1, 1, 1])[0], _batches(1, [0])[0]]
    assert compute_metric("accuracy", out, batches) == 0.75  # 3 of 4 examples


def test_accuracy_without_targets_is_a_data_error():
    with pytest.raises(DataError, match="target"):
        compute_metric("accuracy", [torch.zeros(2, 3)], _batches(2))


def test_top1_agreement_and_confident_agreement_exact():
    out = [torch.tensor([[0.0, 5.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.1]])]
    ref = [torch.tensor([[0.0, 5.0], [1.0, 0.0], [3.0, 0.0], [0.1, 0.0]])]
    batches = _batches(4)
    assert compute_metric("top1_agreement", out, batches, ref) == 0.5
    # reference max-probs: 0.9933, 0.7311, 0.9526, 0.5250 -> three are >= 0.7
    assert confident_agreement(out, ref, threshold=0.7) == (pytest.approx(2 / 3), 3)
    value, count = confident_agreement(out, ref, threshold=0.999)
    assert math.isnan(value) and count == 0


def test_kl_exact():
    ref = [torch.tensor([[0.0, 0.0]])]  # p = (1/2, 1/2)
    out = [torch.tensor([[0.0, math.log(3.0)]])]  # q = (1/4, 3/4)
    # KL(p||q) = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3)
    assert compute_metric("kl", out, _batches(1), ref) == pytest.approx(0.5 * math.log(4 / 3))
    assert compute_metric("kl", ref, _batches(1), ref) == 0.0


def test_cosine_direct_and_mask_pooled():
    out, ref = [torch.tensor([[1.0, 0.0], [0.0, 2.0]])], [torch.tensor([[1.0, 1.0], [0.0, 1.0]])]
    assert compute_metric("cosine", out, _batches(2), ref) == pytest.approx((1 / math.sqrt(2) + 1.0) / 2)
    tokens_out = [torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])]  # (1, 2, 2)
    tokens_ref = [torch.tensor([[[2.0, 0.0], [5.0, 5.0]]])]  # second token differs wildly
    masked = _batches(1, mask=torch.tensor([[1, 0]]))
    assert compute_metric("cosine", tokens_out, masked, tokens_ref) == pytest.approx(1.0)
    unmasked = _batches(1, mask=torch.tensor([[1, 1]]))
    # pooled (0.5, 0.5) vs (3.5, 2.5): cos = 3 / (sqrt(0.5) * sqrt(18.5))
    assert compute_metric("cosine", tokens_out, unmasked, tokens_ref) == pytest.approx(
        3.0 / (math.sqrt(0.5) * math.sqrt(18.5))
    )


def test_metric_errors():
    with pytest.raises(RecipeError) as err:
        compute_metric("f1", [torch.zeros(1, 2)], _batches(1))
    assert all(name in str(err.value) for name in METRICS)
    with pytest.raises(RecipeError, match="reference"):
        compute_metric("cosine", [torch.zeros(1, 2)], _batches(1))
    with pytest.raises(DataError, match="one output tensor per batch"):
        compute_metric("top1_agreement", [torch.zeros(1, 2)] * 2, _batches(1), [torch.zeros(1, 2)] * 2)
    with pytest.raises(DataError, match="shape"):
        compute_metric("kl", [torch.zeros(1, 2)], _batches(1), [torch.zeros(1, 3)])


def test_collect_outputs_unwraps_and_restores_mode():
    transformers = pytest.importorskip("transformers")

    class HFStyle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=self.lin(x))

    model = HFStyle().train()
    outs = collect_outputs(model, [Batch((torch.ones(4, 3),)), Batch((torch.ones(1, 3),))])
    assert [tuple(o.shape) for o in outs] == [(4, 2), (1, 2)]
    assert model.training
    assert first_tensor((None, {"a": torch.ones(1)})).tolist() == [1.0]
    with pytest.raises(ModelError, match="tensor"):
        first_tensor({"a": "text"})
    with pytest.raises(DataError):
        collect_outputs(model, [])


def test_minilm_bench_times_each_candidate_after_its_own_warm_up(monkeypatch):
    """bench/quantize_minilm: in every round each candidate gets two untimed calls and then its
    timed calls back to back, so another runtime's spinning threads only reach the warm-up."""
    from netpress.bench import quantize_minilm as qm

    log: list[str] = []
    clock = iter(range(10_000))
    monkeypatch.setattr(qm.time, "perf_counter", lambda: float(next(clock)))
    fns = {k: (lambda k=k: log.append(k)) for k in ("ort", "ov")}
    ms = qm._round_robin(fns, runs=8)
    per_round = 8 // qm.ROUNDS
    assert log == (["ort"] * (2 + per_round) + ["ov"] * (2 + per_round)) * qm.ROUNDS
    assert ms == {"ort": 1000.0, "ov": 1000.0}  # one fake tick per timed call
