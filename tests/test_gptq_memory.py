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

    real = gptq_mod.gptq_from_stats
    calls = [0]

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(gptq_mod, "gptq_from_stats", failing)
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


def test_streamed_statistics_give_the_codes_of_the_stacked_inputs() -> None:
    """HessianStats fed in uneven pieces (as captures feed it) = the stacked-input reference:
    the Hessian in visiting order, its inverse factor, and the codes, bit for bit."""
    from netpress.quantize.gptq import (
        HessianStats,
        _inverse_cholesky,
        gptq_from_stats,
        gptq_layer,
    )

    g = torch.Generator().manual_seed(3)
    x = torch.randn(700, 64, generator=g) * torch.rand(64, generator=g) * 3
    x[:, 5] = 0.0  # a dead column
    w = torch.randn(24, 64, generator=g)
    stats = HessianStats(0.01, act_order=True)
    for a, b in ((0, 37), (37, 300), (300, 301), (301, 700)):
        stats.add(x[a:b])
    u, perm, dead = stats.inverse()
    assert torch.equal(perm, torch.argsort((x.double() ** 2).sum(0), descending=True))
    assert dead.tolist() == [i == 5 for i in range(64)]
    h = hessian(x, perm=perm)
    dp = dead[perm]
    h[dp, dp] = 1.0
    h.diagonal().add_(0.01 * torch.mean(torch.diag(h)))
    assert torch.equal(u, _inverse_cholesky(h))
    codes = gptq_from_stats(w, stats, bits=4, group_size=16)
    ref = gptq_layer(w, x, bits=4, group_size=16)
    for a, b in zip(codes, ref, strict=True):
        assert torch.equal(a, b)


def test_statistics_shared_by_several_layers_are_freed_after_the_last() -> None:
    from netpress.quantize.gptq import HessianStats, gptq_from_stats

    x, w = torch.randn(300, 32), torch.randn(8, 32)
    stats = HessianStats()
    stats.add(x)
    stats.expect_uses(2)
    first = gptq_from_stats(w, stats, bits=4, group_size=16)
    assert stats._done is not None  # a second layer still needs it
    second = gptq_from_stats(w, stats, bits=4, group_size=16)
    assert stats._done is None
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_release_file_pages_drops_only_clean_file_pages(tmp_path) -> None:
    """A weight memory-mapped from a file: its clean pages leave the process (RSS falls), the
    values read back the same; a written (copied-on-write) page and anonymous memory are kept."""
    import mmap as mmap_mod
    import sys

    from netpress.quantize.sequential import release_file_pages

    if not sys.platform.startswith("linux"):
        pytest.skip("pagemap / madvise are Linux-only")
    n = 4 << 20  # 4 MiB of float32 in a file
    path = tmp_path / "w.bin"
    values = torch.arange(n // 4, dtype=torch.float32)
    path.write_bytes(values.numpy().tobytes())
    with open(path, "r+b") as f:
        mapped = mmap_mod.mmap(f.fileno(), n, flags=mmap_mod.MAP_PRIVATE)
    w = torch.frombuffer(mapped, dtype=torch.float32)

    def rss_file() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))

    assert float(w.sum()) == float(values.sum())  # every page read: resident
    before = rss_file()
    w[0] = -1.0  # the first page is now a private (anonymous) copy
    released = release_file_pages(w)
    # the written page is kept (a huge-page mapping split by the write may have unmapped some
    # other pages already: those are not present, hence not counted)
    assert 0 < released <= n - mmap_mod.PAGESIZE and released % mmap_mod.PAGESIZE == 0
    assert before - rss_file() >= (released >> 10) - 64  # KiB, a little slack for other maps
    assert w[0] == -1.0 and torch.equal(w[1:], values[1:])  # same values, the write kept
    assert release_file_pages(torch.randn(1 << 20)) == 0  # anonymous memory: never
    del w
    mapped.close()
