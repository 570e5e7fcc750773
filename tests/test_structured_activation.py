"""Structured pruning with data-aware importance, mean compensation and sensitivity budgets."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from netpress.api import prune
from netpress.core.config import StageContext
from netpress.core.data import Batch
from netpress.measure.macs import count_macs
from netpress.prune.structured import StructuredPruneConfig, prune_structured
from netpress.prune.structured.activation import allocate


def _constant_channels_net() -> nn.Sequential:
    """Channels 0..7 vary with the input (small weights downstream); channels 8..15 are constant
    after the ReLU (zero weights, bias 3) but have large downstream weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        net[0].weight[8:] = 0.0
        net[0].bias[8:] = 3.0
        net[3].weight[:, :8] *= 0.1
        net[3].weight[:, 8:] = 5.0
        net[4].running_mean.uniform_(-1, 1)
    return net


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Error relative to the variation of ``b`` over the batch (not its constant offset)."""
    return float((a - b).norm() / (b - b.mean(0)).norm())


def test_activation_importance_removes_silent_channels_and_compensates_their_mean():
    net = _constant_channels_net()
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        ref = net(x)
    data = [Batch((x,))]
    l1 = prune(copy.deepcopy(net), {"method": "structured", "ratio": 0.5, "round_to": 8, "importance": "l1"},
               data=data)
    act = prune(copy.deepcopy(net), {"method": "structured", "ratio": 0.5, "round_to": 8,
                      "importance": "activation"}, data=data)
    assert act[0].out_channels == 8 and act[3].in_channels == 8
    with torch.no_grad():
        err_l1, err_act = _rel_err(l1(x), ref), _rel_err(act(x), ref)
    # the constant channels went, and their mean moved into the next BN: the output is unchanged
    assert err_act < 1e-2, err_act  # float32 rounding of the large constant offset
    assert err_l1 > 0.1, err_l1  # l1 keeps the big constant columns and drops the varying ones


def _two_stage_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def test_sensitivity_budget_meets_the_macs_target():
    net = _two_stage_net()
    x = torch.randn(16, 3, 12, 12)
    ex = Batch((x[:1],))
    before = count_macs(net, ex)
    ctx = StageContext(data=[Batch((x,))])
    cfg = StructuredPruneConfig(macs_reduction=1.5, importance="activation",
                                budget="sensitivity", round_to=8)
    out = prune_structured(net, cfg, ctx)
    assert before / count_macs(out, ex) >= 1.5
    fractions = ctx.report["structured"]["fraction"]
    assert isinstance(fractions, list) and len(fractions) == 3
    assert out(x).shape == (16, 5)


def test_allocate_prefers_cheap_groups_and_reports_unreachable_budgets():
    macs = lambda f: int(300 - 100 * f[0] - 100 * f[1] - 100 * f[2])  # noqa: E731
    grid = [0.0, 0.5, 1.0]
    loss = [[0, 1.0, 2.0], [0, 0.1, 0.2], [0, 3.0, 9.0]]
    assert allocate(grid, loss, macs, 200) == [0.0, 1.0, 0.0]
    assert allocate(grid, loss, macs, 150) == [0.5, 1.0, 0.0]
    assert allocate(grid, loss, macs, -1) is None


def test_bert_activation_importance_runs_and_shrinks():
    from transformers import BertConfig, BertModel

    from netpress.zoo.models import MiniLMEncoder

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, vocab_size=100)
    cfg._attn_implementation = "eager"
    model = MiniLMEncoder(BertModel(cfg, add_pooling_layer=False)).eval()
    ids = torch.randint(0, 100, (4, 9))
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with torch.no_grad():
        ref = batch.run(model)
    pruned = prune(model, {"method": "structured", "ratio": 0.5, "round_to": 8,
                           "importance": "activation"}, data=[batch])
    assert pruned.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    assert pruned.bert.encoder.layer[1].intermediate.dense.out_features == 64
    with torch.no_grad():
        out = batch.run(pruned)
    assert out.shape == ref.shape and torch.isfinite(out).all()
