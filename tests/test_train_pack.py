"""train/ loop and quantize/pack."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from netpress.core.data import as_batches
from netpress.core.errors import DataError
from netpress.quantize.pack import pack, packed_numel, unpack
from netpress.train import TrainConfig, fine_tune


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_pack_round_trip_and_size(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (37, 5), generator=g, dtype=torch.int64)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_numel(codes.numel(), bits) == (185 * bits + 7) // 8
    assert torch.equal(unpack(packed, bits, codes.numel()).to(torch.int64), codes.reshape(-1))


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack(torch.tensor([4]), 2)


def test_fine_tune_learns_and_calls_hooks():
    torch.manual_seed(0)
    X = torch.randn(128, 4)
    y = (X[:, 0] + X[:, 1] > 0).long()
    model = nn.Linear(4, 2)
    seen = []

    class Hook:
        def on_step_end(self, step, model, loss):
            seen.append(step)

    res = fine_tune(model, as_batches((X, y), batch_size=32), TrainConfig(epochs=10, lr=0.05),
                    callbacks=[Hook()])
    acc = (model(X).argmax(1) == y).float().mean().item()
    assert acc > 0.9  # measured 0.99
    assert res.steps == 40 and seen == list(range(1, 41))
    assert res.losses[-1] < res.losses[0]
    assert not model.training


def test_fine_tune_needs_labels():
    with pytest.raises(DataError, match="targets"):
        fine_tune(nn.Linear(2, 2), as_batches(torch.randn(4, 2)), TrainConfig())
