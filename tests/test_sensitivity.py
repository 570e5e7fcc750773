"""Per-layer sensitivity (A1): shape, no side effects, ranking, caching, heat map; Pareto maths."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from netpress.core.data import Batch
from netpress.core.errors import DataError, RecipeError
from netpress.search.pareto import Constraints, binding, dominates, pareto_mask
from netpress.search.sensitivity import SensitivityConfig, analyze, cache_file, heatmap_png


@pytest.fixture
def net_and_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    with torch.no_grad():  # one layer made fragile: its weights matter much more to the output
        net[3].weight.mul_(20.0)
    data = [Batch((torch.randn(16, 1, 8, 8),)), Batch((torch.randn(16, 1, 8, 8),))]
    return net, data


CFG = SensitivityConfig(sparsity=[0.5, 0.9], bits=[2], ranks=[0.1], max_examples=24)


def test_shape_and_model_untouched(net_and_data):
    net, data = net_and_data
    before = {k: v.clone() for k, v in net.state_dict().items()}
    t = analyze(net, data, CFG, cache=False)
    assert t.layers == ["0", "3"]
    assert t.columns == ["sparsity 0.5", "sparsity 0.9", "int2", "w8a8", "rank 0.1"]
    assert set(t.drop["0"]) == set(t.columns) and set(t.loss["3"]) == set(t.columns)
    assert t.data == "calibration split, 24 examples"
    assert t.base_metric == 100.0  # agreement with itself
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # 90% sparsity hurts more than 50% (KL to the float outputs), for every layer
    for n in t.layers:
        assert t.loss[n]["sparsity 0.9"] > t.loss[n]["sparsity 0.5"] >= 0
        assert t.loss[n]["int2"] > t.loss[n]["w8a8"] >= 0  # int8 is gentle, 2 bits is not
    assert sorted(t.ranking()) == ["0", "3"]


def test_cache_hit_and_key(net_and_data):
    net, data = net_and_data
    first = analyze(net, data, CFG)
    assert not first.cached and cache_file(first.key).is_file()
    second = analyze(net, data, CFG)
    assert second.cached and second.drop == first.drop and second.loss == first.loss
    other = analyze(net, data, SensitivityConfig(sparsity=[0.5], bits=[], ranks=[], max_examples=24))
    assert other.key != first.key and not other.cached
    with torch.no_grad():
        net[0].weight.add_(0.01)  # a different model is a different key
    assert analyze(net, data, CFG).key != first.key


def test_errors_and_heatmap(net_and_data):
    net, data = net_and_data
    with pytest.raises(DataError, match="calibration"):
        analyze(net, [], CFG, cache=False)
    with pytest.raises(RecipeError, match="targets"):
        analyze(net, data, SensitivityConfig(targets=["nothing"]), cache=False)
    t = analyze(net, data, CFG, cache=False)
    with pytest.raises(RecipeError, match="column"):
        t.ranking("int3")
    assert heatmap_png(t)[:4] == b"\x89PNG"


def P(metric, size, lat, speedup=1.0):  # noqa: N802 - a point literal
    return {"metric": metric, "size_bytes": size, "latency_ms": lat, "speedup": speedup}


def test_pareto_maths():
    a, b, c, d = P(0.99, 4, 2.0), P(0.95, 2, 2.0), P(0.94, 3, 3.0), P(0.99, 4, 2.0)
    assert dominates(b, c) and not dominates(a, b) and not dominates(b, a)
    assert not dominates(a, d)  # equal points do not dominate each other
    assert pareto_mask([a, b, c, d]) == [True, True, False, True]
    # kl: lower is better, so the 0.01 point dominates the 0.05 one
    assert pareto_mask([P(0.05, 1, 1), P(0.01, 1, 1)], lower_metric=True) == [False, True]
    assert pareto_mask([]) == []


def test_constraints_and_binding():
    c = Constraints(max_size_bytes=3, min_speedup=1.5, max_drop=0.02)
    assert c.violations(P(0.99, 2, 1, 2.0), 1.0) == {}
    v = c.violations(P(0.95, 6, 1, 1.2), 1.0)
    assert set(v) == {"max_size_bytes", "max_drop", "min_speedup"}
    assert v["max_size_bytes"] == pytest.approx(1.0) and v["max_drop"] == pytest.approx(0.03)
    # only size stops point 0; only speed stops point 1: both bind
    pts = [P(0.99, 5, 1, 2.0), P(0.99, 2, 1, 1.0), P(0.5, 9, 1, 0.5)]
    names, closest = binding(pts, c, 1.0)
    assert names == ["max_size_bytes", "min_speedup"] and closest[-1] == 2
    # nothing fixes a point by dropping one limit: the closest point's broken limits are named
    names, closest = binding([P(0.5, 9, 1, 0.5)], c, 1.0)
    assert names == ["max_drop", "max_size_bytes", "min_speedup"] and closest == [0]
    assert Constraints(max_latency_ms=1).violations(P(1, 1, 2.0), 1.0) == {"max_latency_ms": 1.0}


@pytest.mark.parametrize("name", ["netpress.search.sensitivity", "netpress.search.pareto",
                                  "netpress.search.space", "netpress.search.planner",
                                  "netpress.search.plan_report", "netpress.search.trial",
                                  "netpress.search.validation"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and (result.attempted > 0 or name.endswith("trial"))


def test_screen_measures_only_the_top_layers_on_all_examples(net_and_data):
    net, data = net_and_data
    net = nn.Sequential(*net, nn.ReLU(), nn.Linear(5, 4)).eval()
    cfg = SensitivityConfig(sparsity=[0.9], bits=[], ranks=[], max_examples=24, screen=1,
                            screen_examples=4)
    t = analyze(net, data, cfg, cache=False)
    coarse = t.extra["coarse"]
    assert set(coarse) == {"0", "3", "5"} and set(coarse["0"]) == {"sparsity 0.9", "w8a8"}
    assert t.extra["screen_examples"] == 4 and "on the first 4 examples" in t.data
    # per setting, the layer of largest coarse score is measured on all 24 examples; not the rest
    expected = {max(coarse, key=lambda n: coarse[n][c]) for c in t.columns}
    assert set(t.extra["screened"]) == expected
    assert {n for n in t.layers if t.measured(n)} == expected
    rest = [n for n in t.layers if n not in expected]
    assert rest and all(t.drop[n]["w8a8"] is None for n in rest)
    assert set(t.ranking()[:len(expected)]) == expected  # measured first, then by coarse score
    assert set(t.ranking()[len(expected):]) == set(rest)
    assert heatmap_png(t)[:4] == b"\x89PNG"  # screened-out layers are blank
    # the measured values equal those of a full analysis
    full = analyze(net, data, SensitivityConfig(sparsity=[0.9], bits=[], ranks=[],
                                                max_examples=24), cache=False)
    for n in expected:
        assert t.drop[n] == full.drop[n] and t.loss[n] == full.loss[n]
    assert t.base_metric == full.base_metric == 100.0
