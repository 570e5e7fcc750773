"""GPTQ's memory-lean paths give the same numbers as the plain ones: chunked packing and unpacking,
the in-place inverse Cholesky, the permuted Hessian, and the float stand-ins that the sequential
stage puts back as LowBitLinear layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from netpress.core.config import StageContext, get_technique, parse_config
from netpress.core.data import Batch
from netpress.nn import LowBitLinear
from netpress.quantize import pack as pack_mod
from netpress.quantize.gptq import _inverse_cholesky, hessian
from netpress.quantize.sequential import trim_heap
from netpress.quantize.weight_only import _FloatTwin, dequantized, lowbit_from_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(70, 48), (130, 64), (8, 16)])
def test_chunked_packing_gives_the_bytes_of_from_codes(bits: int, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(bits)
    out_f, in_f = shape
    codes = torch.randint(0, 1 << bits, shape, generator=g).float()
    scales = torch.rand(out_f, in_f // 16, generator=g) + 0.1
    zeros = torch.randint(0, 1 << bits, (out_f, in_f // 16), generator=g).float()
    bias = torch.randn(out_f, generator=g)
    ref = LowBitLinear.from_codes(codes, scales, zeros, bits, bias)
    got = lowbit_from_codes(codes, scales, zeros, bits, bias, rows=8)
    assert type(got) is LowBitLinear and got.spec() == ref.spec()
    for (k, a), (k2, b) in zip(ref.state_dict().items(), got.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(dequantized(got, rows=16), ref.dequantized_weight())


def test_packing_and_unpacking_run_on_row_chunks(monkeypatch) -> None:
    seen: list[int] = []
    real_pack, real_unpack = pack_mod._pack_bits, pack_mod.unpack
    monkeypatch.setattr(pack_mod, "_pack_bits",
                        lambda c, b: seen.append(c.numel()) or real_pack(c, b))
    monkeypatch.setattr(pack_mod, "unpack",
                        lambda p, b, n: seen.append(n) or real_unpack(p, b, n))
    codes = torch.randint(0, 16, (1000, 256)).float()
    s, z = torch.ones(1000, 2), torch.full((1000, 2), 8.0)
    q = lowbit_from_codes(codes, s, z, 4)
    dequantized(q)
    assert max(seen) <= 64 * 256  # never the whole 256,000-code matrix at once


def test_inverse_cholesky_is_in_place_and_correct() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 50, generator=g, dtype=torch.float64)
    h = a.T @ a / 200 + 0.1 * torch.eye(50, dtype=torch.float64)
    ref_inv = torch.linalg.inv(h)
    ptr = h.data_ptr()
    u = _inverse_cholesky(h)
    assert u.data_ptr() == ptr  # no (I, I) copy
    assert torch.equal(u, torch.triu(u))
    assert torch.allclose(u.T @ u, ref_inv, atol=1e-10)
    ref_u = torch.linalg.cholesky(ref_inv, upper=True)
    assert torch.allclose(u, ref_u, atol=1e-10)


def test_permuted_hessian_equals_the_permuted_matrix() -> None:
    x = torch.randn(700, 24)
    perm = torch.randperm(24)
    full = hessian(x)
    assert torch.allclose(hessian(x, perm=perm), full[perm][:, perm], atol=1e-12)
    assert torch.allclose(full, 2 * x.double().T @ x.double() / 700, atol=1e-10)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


class _Net(nn.Module):
    def __init__(self, head: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.head = nn.Linear(32, 4) if head else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _gptq(model: nn.Module) -> dict:
    g = torch.Generator().manual_seed(1)
    batches = [Batch((torch.randn(20, 5, 32, generator=g),)) for _ in range(2)]
    cfg = parse_config("quantize", {"method": "gptq", "weights": {"bits": 4, "group_size": 16}})
    ctx = StageContext(data=batches)
    get_technique("quantize", "gptq").handler(model, cfg, ctx)
    return ctx.report["gptq"]


@pytest.mark.parametrize("head", [True, False], ids=["head", "blocks-only"])
def test_no_float_stand_in_is_left_in_the_model(head: bool) -> None:
    torch.manual_seed(0)
    model = _Net(head).eval()
    report = _gptq(model)
    assert report["input_captures"] == {"block": 6, "model": int(head)}
    kinds = {type(m).__name__ for m in model.modules()}
    assert "_FloatTwin" not in kinds and "Linear" not in kinds and "LowBitLinear" in kinds
    if not head:  # all in blocks: the stage ran stand-ins only, no LowBitLinear unpacked its codes
        assert all(m._cache is None for m in model.modules() if isinstance(m, LowBitLinear))


def test_stand_ins_are_put_back_when_a_layer_fails(monkeypatch) -> None:
    import importlib

    gptq_mod = importlib.import_module("netpress.quantize.gptq")

    real = gptq_mod.gptq_layer
    calls = [0]

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(gptq_mod, "gptq_layer", failing)
    model = _Net().eval()
    with pytest.raises(RuntimeError, match="boom"):
        _gptq(model)
    assert not any(isinstance(m, _FloatTwin) for m in model.modules())
    assert sum(isinstance(m, LowBitLinear) for m in model.modules()) == 3


def test_float_stand_in_computes_what_the_quantized_layer_computes() -> None:
    lin = nn.Linear(64, 24)
    q = LowBitLinear.from_float(lin, bits=4, group_size=32)
    x = torch.randn(3, 7, 64)
    assert torch.equal(_FloatTwin(q)(x), q(x))


def test_trim_heap_is_harmless() -> None:
    trim_heap()
    trim_heap()
    assert np.isfinite(1.0)
