"""distill/: KD losses (gradient equality of the two forms), FitNets hints, students, the stage."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from netpress.api import apply
from netpress.core.data import as_batches
from netpress.core.errors import ModelError, RecipeError
from netpress.distill import (
    DistillConfig,
    FeatureTaps,
    build_adapters,
    derive_student,
    distill,
    kd_kl,
    kd_loss,
    soft_target_ce,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    return X, y


def _mlp(hidden, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 3))


def test_soft_ce_and_kl_have_the_same_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, requires_grad=True)
    t = torch.randn(6, 5, generator=g)
    (ga,) = torch.autograd.grad(kd_kl(s, t, 3.0), s)
    (gb,) = torch.autograd.grad(soft_target_ce(s, t, 3.0), s)
    assert torch.allclose(ga, gb, atol=1e-6)  # max diff measured ~1e-8
    # analytic: T * (p_s(T) - p_t(T)) / B
    expected = 3.0 * (torch.softmax(s / 3, -1) - torch.softmax(t / 3, -1)) / 6
    assert torch.allclose(ga, expected.detach(), atol=1e-6)
    # the values differ by T^2 * H(p_t(T))
    pt = torch.softmax(t / 3, -1)
    ent = -(pt * pt.log()).sum(-1).mean() * 9
    assert float((soft_target_ce(s, t, 3.0) - kd_kl(s, t, 3.0)).detach()) == pytest.approx(float(ent), 1e-5)


def test_kd_loss_mixes_ce_and_kl():
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.tensor([0, 1, 2, 0])
    got = kd_loss(s, t, y, temperature=2.0, alpha=0.3)
    ref = 0.7 * nn.functional.cross_entropy(s, y) + 0.3 * kd_kl(s, t, 2.0)
    assert float(got) == pytest.approx(float(ref), rel=1e-6)


def test_incompatible_outputs_raise():
    X, y = _data()
    teacher = _mlp(16)
    student = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 7))
    with pytest.raises(ModelError, match="same shape"):
        distill(student, teacher, (X, y), {"epochs": 1})


def test_feature_pairs_without_adapter_raise_and_hooks_are_removed():
    X, _ = _data()
    s, t = _mlp(4), _mlp(16)
    with pytest.raises(RecipeError, match="adapter"):
        with FeatureTaps(s, t, [("1", "1")]) as taps:
            s(X[:2]), t(X[:2])
            build_adapters(taps, adapter=False)
    assert all(not m._forward_hooks for m in [*s.modules(), *t.modules()])
    with pytest.raises(RecipeError, match="student layer"):
        FeatureTaps(s, t, [("nope", "1")])


def test_kd_beats_labels_alone_and_feature_kd_runs():
    X, y = _data(512)
    teacher = _mlp(64, seed=1)
    apply("distill", teacher, {"method": "kd", "alpha": 0.0, "epochs": 1, "lr": 0.01,
                               "teacher": "input"}, data=(X, y))  # warm-up: the stage API
    from netpress.train import TrainConfig, fine_tune

    fine_tune(teacher, as_batches((X, y), 64), TrainConfig(epochs=25, lr=0.01))
    student = _mlp(4, seed=2)
    student, res = distill(student, teacher, (X, y), {"method": "kd", "epochs": 10, "lr": 0.02})
    assert res.losses[-1] < res.losses[0]
    agree = (student(X).argmax(1) == teacher(X).argmax(1)).float().mean()
    assert agree > 0.85  # measured 0.96
    fs = _mlp(4, seed=2)
    fs, res = distill(fs, teacher, (X, y), {"method": "feature_kd", "features": [["1", "1"]],
                                            "epochs": 5, "lr": 0.01})
    assert res.steps == 5 * 16 and all(not m._forward_hooks for m in fs.modules())


def test_derive_student_cnn_is_smaller_and_runs():
    from netpress.zoo.trained import digits_cnn

    t = digits_cnn(16)
    s = derive_student(t, width=0.5)
    n_t = sum(p.numel() for p in t.parameters())
    n_s = sum(p.numel() for p in s.parameters())
    assert n_t / n_s > 3.5  # measured 3.6x (conv weights scale with width^2)
    assert s(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    deep = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    shallow = derive_student(deep, width=1.0, depth=0.5)
    assert len([m for m in shallow if isinstance(m, nn.Linear)]) == 3
    with pytest.raises(ModelError):
        derive_student(nn.LSTM(3, 3))


def test_distill_stage_derived_student_and_sparsity_kept():
    X, y = _data()
    teacher = _mlp(32)
    out = apply("distill", teacher, {"method": "kd", "teacher": "input", "epochs": 2, "lr": 0.01,
                                     "student": {"derive": {"width": 0.5}}}, data=(X, y))
    assert out[0].out_features == 16
    pruned = apply("prune", teacher, {"method": "magnitude", "sparsity": 0.8})
    zeros = int((pruned[2].weight == 0).sum())
    rec = apply("distill", pruned, {"method": "kd", "teacher": "input", "epochs": 2, "lr": 0.01},
                data=(X, y))
    assert int((rec[2].weight == 0).sum()) == zeros  # pruned weights stay pruned
    with pytest.raises(RecipeError, match="feature_kd"):
        apply("distill", teacher, {"method": "feature_kd"}, data=(X, y))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_distill_device_cuda_without_cuda_is_a_recipe_error_and_cpu_is_the_default():
    assert DistillConfig().train_config().device == "cpu"
    teacher = nn.Sequential(nn.Linear(4, 3))
    student = nn.Sequential(nn.Linear(4, 3))
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with pytest.raises(RecipeError, match="cuda"):
        distill(student, teacher, as_batches((X, y), batch_size=8), DistillConfig(device="cuda", epochs=1))
    with pytest.raises(ValueError):
        DistillConfig(device="gpu")


def test_distill_leaves_the_teacher_as_it_was_and_warns_on_frozen_codes():
    X, y = _data()
    teacher = _mlp(32).train()
    distill(_mlp(8, seed=1), teacher, (X, y), {"method": "kd", "epochs": 1})
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    frozen = _mlp(8, seed=1)
    for m in frozen:
        if isinstance(m, nn.Linear):
            m.weight.requires_grad_(False)  # what int8 / packed layers look like: codes are buffers
    with pytest.warns(UserWarning, match="no trainable weight matrix.*method: qat, distill"):
        distill(frozen, teacher, (X, y), {"method": "kd", "epochs": 1})
