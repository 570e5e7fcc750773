"""P1 unstructured magnitude pruning: exact counts, scopes, threshold mode, targeting, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from netpress.api import prune as apply_prune
from netpress.core.config import StageContext, parse_config
from netpress.core.errors import ModelError, RecipeError
from netpress.core.recipe import Recipe
from netpress.prune.magnitude import (
    MagnitudePruneConfig,
    keep_masks,
    prune_count,
    prune_magnitude,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)  # 432 weights
        self.conv1d = nn.Conv1d(4, 6, 5)  # 120 weights
        self.fc1 = nn.Linear(50, 30)  # 1500 weights
        self.head = nn.Linear(30, 7)  # 210 weights
        self.norm = nn.LayerNorm(30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 50) -> (B, 7)
        return self.head(self.norm(torch.relu(self.fc1(x))))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():  # layers on different scales, so global and layer scope differ
        model.conv.weight.mul_(4.0)
        model.head.weight.mul_(0.1)
    return model


def nonzeros(t: torch.Tensor) -> int:
    return int((t != 0).sum())


WEIGHTS = ("conv", "conv1d", "fc1", "head")


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.9, 0.999])
def test_layer_scope_removes_exactly_floor_p_n_per_layer(net: Net, p: float) -> None:
    pruned = apply_prune(net, {"method": "magnitude", "sparsity": p})
    for name in WEIGHTS:
        w, orig = getattr(pruned, name).weight, getattr(net, name).weight
        n = w.numel()
        assert nonzeros(w) == n - math.floor(p * n + 1e-9)
        kept = w != 0  # survivors keep their exact values and are the largest |w|
        assert torch.equal(w[kept], orig[kept])
        if 0 < nonzeros(w) < n:
            assert orig.abs()[~kept].max() <= orig.abs()[kept].min()
    assert torch.equal(pruned.norm.weight, net.norm.weight)  # not a default target


def test_prune_count_is_robust_to_float_error() -> None:
    assert prune_count(10, 0.3) == 3  # 0.3 * 10 = 2.9999999999999996
    assert prune_count(9, 0.5) == 4 and prune_count(1000, 0.7) == 700 and prune_count(5, 0.0) == 0


@pytest.mark.parametrize("p", [0.5, 0.8, 0.95])
def test_global_scope_ranks_all_targets_together(net: Net, p: float) -> None:
    ctx = StageContext()
    pruned = prune_magnitude(net, MagnitudePruneConfig(sparsity=p, scope="global"), ctx)
    weights = [getattr(pruned, n).weight for n in WEIGHTS]
    total = sum(w.numel() for w in weights)  # 2262
    assert sum(nonzeros(w) for w in weights) == total - math.floor(p * total)
    per_layer = {n: v["zeros"] / v["numel"] for n, v in ctx.report["magnitude"]["layers"].items()}
    assert per_layer["conv"] < p < per_layer["head"]  # big-scale layer keeps more
    assert math.isclose(ctx.report["magnitude"]["sparsity"], math.floor(p * total) / total)


def test_global_cut_is_a_single_threshold_over_all_layers() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 40))
    with torch.no_grad():
        model[1].weight.mul_(3)
    original = [m.weight.detach().clone() for m in model]
    pruned = apply_prune(model, {"method": "magnitude", "sparsity": 0.6, "scope": "global"})
    pairs = list(zip(original, [m.weight for m in pruned], strict=True))
    removed = torch.cat([o[w == 0].abs() for o, w in pairs])
    kept = torch.cat([o[w != 0].abs() for o, w in pairs])
    assert removed.max() <= kept.min()


def test_ties_are_broken_deterministically() -> None:
    masks = keep_masks([torch.ones(2, 3), torch.ones(4)], n_prune=7)
    assert masks[0].tolist() == [[False, False, False], [False, False, False]]
    assert masks[1].tolist() == [False, True, True, True]  # earlier layer first, then low index
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    a = apply_prune(model, {"method": "magnitude", "sparsity": 0.5})
    b = apply_prune(model, {"method": "magnitude", "sparsity": 0.5})
    assert torch.equal(a[0].weight, b[0].weight) and nonzeros(a[0].weight) == 8


def test_already_zero_weights_are_pruned_first() -> None:
    lin = nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.0, 5, -4, 3, -2, 1, 0.5, -6, 7]]))
    pruned = apply_prune(nn.Sequential(lin), {"method": "magnitude", "sparsity": 0.4})
    assert pruned[0].weight.tolist() == [[0, 0, 5, -4, 3, -2, 0, 0, -6, 7]]


def test_threshold_mode_zeroes_exactly_below_tau(net: Net) -> None:
    tau = 0.05
    pruned = apply_prune(net, {"method": "magnitude", "threshold": tau})
    for name in WEIGHTS:
        w, orig = getattr(pruned, name).weight, getattr(net, name).weight
        below = orig.abs() < tau
        assert bool((w[below] == 0).all()) and torch.equal(w[~below], orig[~below])
    zero = apply_prune(net, {"method": "magnitude", "threshold": 0.0})
    assert all(torch.equal(getattr(zero, n).weight, getattr(net, n).weight) for n in WEIGHTS)


def test_zeros_are_positive_and_weights_stay_dense_fp32(net: Net) -> None:
    pruned = apply_prune(net, {"method": "magnitude", "sparsity": 0.5})
    w = pruned.fc1.weight
    assert w.dtype == torch.float32 and w.layout == torch.strided and isinstance(w, nn.Parameter)
    assert not bool(torch.signbit(w[w == 0]).any())  # masked_fill gives +0.0, never -0.0
    assert set(pruned.state_dict()) == set(net.state_dict())  # no mask buffers


def test_ignore_and_targets_are_honoured(net: Net) -> None:
    pruned = apply_prune(net, {"method": "magnitude", "sparsity": 0.5,
                               "ignore": ["head", "re:conv.*"]})
    assert nonzeros(pruned.fc1.weight) == 750
    for name in ("head", "conv", "conv1d"):
        assert torch.equal(getattr(pruned, name).weight, getattr(net, name).weight)
    only = apply_prune(net, {"method": "magnitude", "sparsity": 0.5, "targets": ["Conv1d", "norm"]})
    assert nonzeros(only.conv1d.weight) == 60 and nonzeros(only.norm.weight) == 15
    assert torch.equal(only.fc1.weight, net.fc1.weight)
    with pytest.raises(RecipeError, match="targets"):
        apply_prune(net, {"method": "magnitude", "sparsity": 0.5, "targets": ["nope"]})
    with pytest.raises(RecipeError, match="targets"):
        apply_prune(net, {"method": "magnitude", "sparsity": 0.5, "targets": ["ReLU"]})


@pytest.mark.parametrize("bad", [
    {"sparsity": 1.0}, {"sparsity": -0.1}, {"sparsity": float("nan")}, {"threshold": -1},
    {"threshold": float("inf")}, {"sparsity": 0.5, "threshold": 0.1}, {}, {"scope": "model"},
    {"sparsity": 0.5, "amount": 0.5}, {"sparsity": "half"},
])
def test_bad_config_is_a_recipe_error(bad: dict) -> None:
    with pytest.raises(RecipeError):
        parse_config("prune", {"method": "magnitude", **bad})


def test_config_round_trips_and_works_from_a_recipe() -> None:
    r = Recipe.from_dict({"model": "zoo:x", "stages": [
        {"prune": {"method": "magnitude", "sparsity": 0.5, "scope": "global", "ignore": ["a"]}}]})
    cfg = r.stages[0].config
    assert isinstance(cfg, MagnitudePruneConfig) and cfg.scope == "global"
    assert MagnitudePruneConfig.from_dict(cfg.to_dict()) == cfg


def test_nan_weight_is_a_model_error(net: Net) -> None:
    with torch.no_grad():
        net.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match="fc1.weight"):
        apply_prune(net, {"method": "magnitude", "sparsity": 0.5})


def test_large_global_count_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))  # 2.1 M weights
    with torch.no_grad():
        model[0].weight.round_(decimals=2)  # many exact ties at the cut
    pruned = apply_prune(model, {"method": "magnitude", "sparsity": 0.77, "scope": "global"})
    n = 2 * 1024 * 1024
    assert nonzeros(pruned[0].weight) + nonzeros(pruned[1].weight) == n - math.floor(0.77 * n)


def test_global_scope_that_empties_a_layer_warns_and_reports_it():
    import warnings

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        m[2].weight.mul_(0.001)  # the smallest weights: global 85 % takes all of them
    report: dict = {}
    with pytest.warns(UserWarning, match=r"every weight of 1 layer\(s\) is now zero \(2\)"):
        apply_prune(m, {"method": "magnitude", "sparsity": 0.85, "scope": "global"}, report=report)
    assert report["magnitude"]["emptied_layers"] == ["2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # layer scope: 85 % of each, nothing emptied, no warning
        apply_prune(m, {"method": "magnitude", "sparsity": 0.85, "scope": "layer"})
