"""distill/augment: shift / noise / mixup on signals, mixed labels, KD on augmented batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.core.data import Batch
from netpress.core.errors import DataError
from netpress.distill import AugmentConfig, augment_batch, augmented_ce, distill, mixed_ce

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shift_rolls_and_mixup_mixes_labels():
    x = torch.arange(10.0).reshape(2, 1, 5)
    b = Batch((x,), torch.tensor([0, 1]))
    out, mix = augment_batch(b, AugmentConfig(shift=2), torch.Generator().manual_seed(3))
    s = [k for k in range(-2, 3) if torch.equal(out.inputs[0], torch.roll(x, k, -1))]
    assert len(s) == 1 and mix is None
    out, mix = augment_batch(b, AugmentConfig(mixup=1.0), torch.Generator().manual_seed(0))
    lam, perm = mix
    expect = lam.view(2, 1, 1) * x + (1 - lam.view(2, 1, 1)) * x[perm]
    assert torch.allclose(out.inputs[0], expect)
    logits = torch.randn(2, 3)
    y = torch.tensor([0, 2])
    ce = (lam * F.cross_entropy(logits, y, reduction="none")
          + (1 - lam) * F.cross_entropy(logits, y[perm], reduction="none")).mean()
    assert torch.allclose(mixed_ce(logits, y, mix), ce)
    assert torch.allclose(mixed_ce(logits, y, None), F.cross_entropy(logits, y))


def test_noise_scale_and_token_inputs_rejected():
    x = torch.randn(64, 1, 40)
    out, _ = augment_batch(Batch((x,)), AugmentConfig(noise=0.1), torch.Generator().manual_seed(0))
    ratio = float((out.inputs[0] - x).std() / x.std())
    assert 0.08 < ratio < 0.12  # measured ~0.10
    ids = Batch({"input_ids": torch.ones(2, 4, dtype=torch.long)})
    with pytest.raises(DataError, match="augment"):
        augment_batch(ids, AugmentConfig(shift=1), torch.Generator())
    with pytest.raises(ValueError):
        AugmentConfig(shift=1, blur=3)
    with pytest.raises(DataError, match="image batches"):
        augment_batch(Batch((x,)), AugmentConfig(rotate=10), torch.Generator())


def _centre(x: torch.Tensor) -> torch.Tensor:
    """Centre of mass (row, col) of each image of a (B, 1, H, W) batch."""
    h, w = x.shape[-2:]
    rows, cols = torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype)
    m = x.sum((1, 2, 3))
    return torch.stack([(x.sum((1, 3)) * rows).sum(1) / m, (x.sum((1, 2)) * cols).sum(1) / m], 1)


def test_affine_warp_moves_each_image_by_its_own_draw():
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = torch.exp(-((yy - 7.5) ** 2 + (xx - 9.5) ** 2) / 2.0)  # 2 px right of the centre
    x = blob.expand(64, 1, 16, 16).contiguous()
    gen = torch.Generator().manual_seed(0)
    same, _ = augment_batch(Batch((x,)), AugmentConfig(translate=1e-6), gen)
    assert torch.allclose(same.inputs[0], x, atol=1e-5)  # the grid maps pixel centres exactly
    moved, _ = augment_batch(Batch((x,)), AugmentConfig(translate=1.0), gen)
    d = _centre(moved.inputs[0]) - _centre(x)
    assert d.abs().max() <= 1.0 + 1e-3 and d.std(0).min() > 0.3  # per-example offsets in [-1, 1]
    turned, _ = augment_batch(Batch((x,)), AugmentConfig(rotate=90), gen)
    c = _centre(turned.inputs[0]) - 7.5
    assert torch.allclose(c.norm(dim=1), torch.full((64,), 2.0), atol=0.05)  # same radius
    angles = torch.rad2deg(torch.atan2(c[:, 0], c[:, 1]))
    assert angles.abs().max() <= 90.5 and angles.std() > 30  # angles spread over [-90, 90]
    mass = turned.inputs[0].sum((1, 2, 3))
    assert torch.allclose(mass, x.sum((1, 2, 3)), rtol=0.02)  # bilinear: measured within 0.8 %


def test_augmented_distillation_trains():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 1, 16, generator=g)
    y = (X.mean(-1).squeeze(1) > 0).long()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        teacher[1].weight.fill_(1.0)
        teacher[1].weight[0].fill_(-1.0)
        teacher[1].bias.zero_()
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    cfg = {"method": "kd", "epochs": 6, "lr": 0.05, "augment": {"shift": 3, "noise": 0.05,
                                                                 "mixup": 1.0}}
    student, res = distill(student, teacher, (X, y), cfg)
    assert res.losses[-1] < 0.5 * res.losses[0]
    assert (student(X).argmax(1) == y).float().mean() > 0.95  # shift-invariant task: learnable
    loss_fn = augmented_ce({"shift": 2, "mixup": 0.4}, seed=1)
    assert float(loss_fn(student, Batch((X[:32],), y[:32]))) > 0
    with pytest.raises(DataError):
        loss_fn(student, Batch((X[:32],)))
