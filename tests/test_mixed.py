"""Mixed precision (Q9): sensitivity on calibration data, greedy widths under a budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from netpress.core.config import StageContext
from netpress.core.data import Batch, as_batches
from netpress.core.errors import DataError, RecipeError
from netpress.export.artifact import load, save_artifact
from netpress.quantize.mixed import MixedConfig, choose_bits, layer_bytes, quantize_mixed


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 4))


@pytest.fixture
def data() -> list[Batch]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, :2].sum(1) > 0).long() + 2 * (x[:, 2:4].sum(1) > 0).long()
    return as_batches((x, y), batch_size=64)


@pytest.fixture
def trained(data: list[Batch]) -> nn.Module:
    from netpress.train import TrainConfig, fine_tune

    model = mlp()
    fine_tune(model, data, TrainConfig(epochs=10, lr=0.01))
    return model.eval()


def test_layer_bytes_and_greedy_choice() -> None:
    lin = nn.Linear(64, 64)
    assert layer_bytes(lin, 4) == 64 * 64 // 2 + 64 * 4
    layers = [("a", nn.Linear(64, 64)), ("b", nn.Linear(64, 64))]
    table = {"a": {2: {"drop": 9.0, "loss_increase": 1.0}, 4: {"drop": 0.5, "loss_increase": 0.1},
                   8: {"drop": 0.0, "loss_increase": 0.0}},
             "b": {2: {"drop": 0.2, "loss_increase": 0.01}, 4: {"drop": 0.0, "loss_increase": 0.0},
                   8: {"drop": 0.0, "loss_increase": 0.0}}}
    budget = layer_bytes(lin, 4) + layer_bytes(lin, 2)
    # b is cheap to lower all the way; a stays at 4 bits
    assert choose_bits(layers, [2, 4, 8], table, budget) == {"a": 4, "b": 2}
    with pytest.raises(RecipeError, match="size_budget_bytes.*every layer at 2 bits"):
        choose_bits(layers, [2, 4, 8], table, 100)


def test_mixed_meets_budget_reports_bits_and_reloads(trained: nn.Module, data: list[Batch],
                                                     tmp_path) -> None:
    calib, train = data[:2], data
    ctx = StageContext(data=calib, advanced={"train": train})
    cfg = MixedConfig(size_ratio=6, finetune={"epochs": 2, "lr": 1e-3})
    q = quantize_mixed(trained, cfg, ctx)
    rep = ctx.report["mixed"]
    assert rep["weight_bytes"] <= rep["budget_bytes"]
    assert set(rep["bits_per_layer"]) == {"0", "2", "4"}
    assert set(rep["bits_per_layer"].values()) <= {2, 4, 8}
    assert rep["sensitivity_data"] == "calibration split, 2 batches"
    assert set(rep["sensitivity"]["2"]) == {"2", "4", "8"}
    assert rep["sensitivity"]["2"]["8"]["drop"] <= rep["sensitivity"]["2"]["2"]["drop"]
    for name, bits in rep["bits_per_layer"].items():
        assert q.get_submodule(name).bits == bits
    x = torch.cat([b.inputs[0] for b in data])
    with torch.no_grad():
        hits = int((q(x).argmax(1) == torch.cat([b.target for b in data])).sum())
    assert hits / x.shape[0] >= 0.8  # measured 0.95 (float 0.97)
    src = {"kind": "module", "factory": f"{__name__}:mlp"}
    save_artifact(q, tmp_path / "mixed", source=src, recipe={})
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "mixed")(x), q(x))


def test_mixed_bad_input(trained: nn.Module) -> None:
    with pytest.raises(RecipeError, match="out of range"):
        MixedConfig.from_dict({"method": "mixed", "bits": [1, 4], "size_ratio": 4})
    with pytest.raises(RecipeError, match="exactly one"):
        MixedConfig.from_dict({"method": "mixed"})
    with pytest.raises(RecipeError, match="exactly one"):
        MixedConfig.from_dict({"method": "mixed", "size_ratio": 4, "size_budget_bytes": 10})
    with pytest.raises(DataError, match="calibration"):
        quantize_mixed(trained, MixedConfig(size_ratio=4), StageContext(data=None))
