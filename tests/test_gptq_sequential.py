"""Sequential layer-input capture for GPTQ/AWQ: the block cache and shared q/k/v captures give the
same codes as whole-model forwards, and fall back when the block data flow does not check out."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from netpress.core.config import StageContext, get_technique, parse_config
from netpress.core.data import Batch
from netpress.nn import LowBitLinear
from netpress.quantize import sequential


class Block(nn.Module):
    """Attention-like block: q, k, v read the same tensor; a residual; an MLP."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) * scale, -1) @ self.v(x)
        x = x + self.o(att)
        return x + self.down(torch.relu(self.up(x)))


class Tiny(nn.Module):
    def __init__(self, n: int = 3, varying: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(32, 4)
        self.varying = varying  # a per-block argument: the block cache must not apply

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        scale = torch.tensor(32 ** -0.5)
        for i, b in enumerate(self.blocks):
            h = b(h, scale * (1 + i) if self.varying else scale)
        return self.head(h)


def _batches() -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [Batch((torch.randn(4, 6, 16, generator=g),)) for _ in range(3)]


def _gptq(model: nn.Module, batches: list[Batch]) -> tuple[nn.Module, dict]:
    cfg = parse_config("quantize", {"method": "gptq", "weights": {"bits": 3, "group_size": 16}})
    ctx = StageContext(data=batches)
    q = get_technique("quantize", "gptq").handler(model, cfg, ctx)
    return q, ctx.report["gptq"]


@pytest.mark.parametrize("varying", [False, True], ids=["block-cache", "fallback"])
def test_fast_capture_gives_the_same_codes_as_whole_model_forwards(varying, monkeypatch) -> None:
    torch.manual_seed(0)
    model = Tiny(varying=varying).eval()
    batches = _batches()
    fast, report = _gptq(copy.deepcopy(model), batches)
    # 1 (inp) + per block: q/k/v shared, o, up, down -> 4 captures + 1 (head) = 14, not 20
    if varying:
        assert report["input_captures"] == {"block": 0, "model": 14}
    else:
        assert report["input_captures"] == {"block": 12, "model": 2}
    monkeypatch.setattr(sequential.BlockCache, "build", classmethod(lambda *a, **k: None))
    monkeypatch.setattr(sequential, "capture_runs", _no_sharing(sequential.capture_runs))
    slow, report = _gptq(copy.deepcopy(model), batches)
    assert report["input_captures"] == {"block": 0, "model": 20}
    for (name, a), (_, b) in zip(fast.named_modules(), slow.named_modules(), strict=True):
        if isinstance(a, LowBitLinear):
            assert torch.equal(a.qweight, b.qweight), name
            assert torch.equal(a.scales, b.scales), name


def _no_sharing(fn):
    def wrapped(runs, layer, followers, name, stop=True, sink=None):
        return fn(runs, layer, [], name, stop, sink)
    return wrapped


def test_shared_capture_stops_at_the_first_layer_with_another_input() -> None:
    blk = Block().eval()
    x0 = torch.randn(2, 5, 32)
    runs = [(lambda: blk(x0, torch.tensor(1.0)), None)]
    x, shared = sequential.capture_runs(runs, blk.q, [("k", blk.k), ("v", blk.v), ("o", blk.o),
                                                     ("up", blk.up)], "q")
    assert shared == ["k", "v"] and x.shape == (10, 32)


def test_block_cache_refuses_a_block_list_whose_arguments_change() -> None:
    names = [n for n, m in Tiny().named_modules() if isinstance(m, nn.Linear)]
    assert sequential.BlockCache.build(Tiny(), _batches(), names) is not None
    assert sequential.BlockCache.build(Tiny(varying=True), _batches(), names) is None
