"""KD recovery of structurally pruned CNNs: kept-channel matching, views, the training loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.api import prune
from netpress.prune.structured.recover import (
    feature_errors,
    kd_recover,
    kept_channels,
    mix_views,
    random_views,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 6))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
    return net.eval()


def test_kept_channels_maps_pruned_features_to_the_original_ones():
    net = _net()
    x = torch.randn(4, 3, 10, 10)
    small = prune(copy.deepcopy(net), {"method": "structured", "ratio": 0.5, "round_to": 1},
                  data=[(x,)])
    idx = kept_channels(net[1], small[1])
    assert len(idx) == small[1].num_features == 16
    assert len(set(idx.tolist())) == 16
    # the first block is untouched on its kept channels: same outputs, channel for channel
    torch.testing.assert_close(small[:3](x), net[:3](x)[:, idx])
    torch.testing.assert_close(small[1].weight, net[1].weight[idx])


def test_kept_channels_rejects_ambiguous_or_unknown_channels():
    a, b = nn.BatchNorm2d(4), nn.BatchNorm2d(2)  # default affine params: all alike
    with pytest.raises(ValueError, match="matches 4 original"):
        kept_channels(a, b)
    with torch.no_grad():
        a.weight.copy_(torch.arange(4.0))
        b.weight.fill_(7.0)
    with pytest.raises(ValueError, match="matches 0 original"):
        kept_channels(a, b)
    assert kept_channels(a, a).tolist() == [0, 1, 2, 3]


def test_random_views_are_crops_of_the_source():
    img = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(3, 20, 30)
    gen = torch.Generator().manual_seed(0)
    views = random_views([img, torch.full((3, 8, 8), 5.0)], 16, 6, gen)
    assert views.shape == (16, 3, 6, 6)
    assert float(views.min()) >= 0.0 and float(views.max()) <= float(img.max())
    const = random_views([torch.full((3, 8, 8), 5.0)], 4, 6, gen)
    torch.testing.assert_close(const, torch.full_like(const, 5.0))


def test_mix_views_are_convex_combinations_of_the_batch():
    x = torch.stack([torch.full((3, 8, 8), float(v)) for v in (0, 1, 2, 3)])
    for seed in range(6):
        out = mix_views(x, torch.Generator().manual_seed(seed))
        assert out.shape == x.shape
        assert float(out.min()) >= 0.0 and float(out.max()) <= 3.0
        assert torch.allclose(out.mean(), x.mean(), atol=0.75)


def _kl(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(teacher(x), 1),
                              log_target=True, reduction="batchmean"))


def test_kd_recover_brings_a_pruned_net_closer_to_the_original():
    teacher = _net()
    images = [torch.randn(3, 24, 24) for _ in range(3)]
    x = torch.randn(8, 3, 10, 10)
    student = prune(copy.deepcopy(teacher), {"method": "structured", "ratio": 0.5,
                                             "round_to": 1}, data=[(x,)])
    feats = {"2": ("2", kept_channels(teacher[1], student[1])),
             "5": ("5", kept_channels(teacher[4], student[4]))}
    probe = random_views(images, 32, 10, torch.Generator().manual_seed(9))
    before = _kl(student, teacher, probe)
    stats = kd_recover(student, teacher, images, steps=60, batch=16, res=10, lr=5e-3,
                       features=feats, mix=True, seed=1)
    after = _kl(student.eval(), teacher, probe)
    assert stats["steps"] == 60 and len(stats["loss"]) == 60
    assert after < 0.5 * before, (before, after)
    # the teacher was frozen during the run only: it can still be pruned / trained afterwards
    assert all(p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_kd_recover_time_budget_lowers_the_step_count():
    teacher = _net()
    student = copy.deepcopy(teacher)
    stats = kd_recover(student, teacher, [torch.randn(3, 16, 16)], steps=10_000, batch=2, res=8,
                       max_seconds=0.05)
    assert 4 <= stats["steps"] < 10_000
    assert len(stats["loss"]) == stats["steps"]


def test_kd_recover_rejects_unknown_feature_layers():
    teacher = _net()
    with pytest.raises(ValueError, match="no module named"):
        kd_recover(copy.deepcopy(teacher), teacher, [torch.randn(3, 8, 8)], steps=1,
                   features={"nope": ("2", torch.arange(4))})


def test_feature_errors_are_zero_where_the_pruned_net_is_exact():
    net = _net()
    x = torch.randn(4, 3, 10, 10)
    small = prune(copy.deepcopy(net), {"method": "structured", "ratio": 0.5, "round_to": 1},
                  data=[(x,)])
    feats = {"2": ("2", kept_channels(net[1], small[1])),
             "5": ("5", kept_channels(net[4], small[4]))}
    err = feature_errors(small, net, feats, x)
    assert err["2"] < 1e-10  # the first block keeps its channels exactly
    assert err["5"] > 1e-3  # the second lost half of its inputs
    deeper = (small[:6](x) - net[:6](x)[:, feats["5"][1]]).pow(2).sum()
    assert err["5"] == pytest.approx(float(deeper / net[:6](x)[:, feats["5"][1]].pow(2).sum()),
                                     rel=1e-4)
