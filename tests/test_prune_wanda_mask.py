"""Wanda's training-free options: RIA score, mask swap search, per-type sparsity, dense target +
LayerNorm refit (weights of pruned matrices keep their dense values)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from netpress.api import prune as apply_prune
from netpress.core.errors import RecipeError
from netpress.prune.scores import row_masks
from netpress.prune.wanda_mask import refine_mask, ria_score

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 600, cols: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    X[:, :3] *= 15.0  # outlier features
    return X + torch.randn(cols, generator=g)  # a non-zero mean


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 64), nn.LayerNorm(64), nn.Linear(64, 32))


def _err(X: torch.Tensor, W: torch.Tensor, Q: torch.Tensor) -> float:
    return float((X @ (W - Q).T).square().sum())


def test_refine_mask_lowers_the_quadratic_error_and_keeps_row_counts() -> None:
    X = _data()
    W = torch.randn(16, 48, generator=torch.Generator().manual_seed(1))
    C = 2 / X.shape[0] * X.T @ X
    keep = row_masks(W.abs() * X.norm(dim=0), 0.5)
    new, swaps = refine_mask(W, W, keep, C, max_swaps=32)
    assert swaps > 0
    assert torch.equal(new.sum(1), keep.sum(1))
    assert _err(X, W, W * new) < 0.9 * _err(X, W, W * keep)
    again, more = refine_mask(W, W, new, C, max_swaps=32)  # a local optimum: nothing left
    assert more == 0 and torch.equal(again, new)
    wide, _ = refine_mask(W, W, keep, C, max_swaps=32, candidates=4, chunk=5)  # row chunks
    assert torch.equal(wide.sum(1), keep.sum(1))
    assert _err(X, W, W * wide) < 0.9 * _err(X, W, W * keep)


def test_ria_score_is_relative_importance_times_sqrt_norm() -> None:
    W = torch.tensor([[1.0, -3.0], [2.0, 2.0]])
    s = ria_score(W, torch.tensor([9.0, 1.0]), alpha=0.5)
    expect = torch.tensor([[1 / 4 + 1 / 3, 3 / 4 + 3 / 5], [2 / 4 + 2 / 3, 2 / 4 + 2 / 5]])
    assert torch.allclose(s, expect * torch.tensor([[3.0, 1.0]]))


def test_wanda_mask_refine_beats_plain_wanda_without_changing_kept_weights() -> None:
    X = _data()
    errs = {}
    for refine in (0, 16):
        model = nn.Sequential(nn.Linear(48, 24, bias=False))
        torch.manual_seed(3)
        nn.init.normal_(model[0].weight)
        W = model[0].weight.detach().clone()
        pruned = apply_prune(model, {"method": "wanda", "sparsity": 0.5, "mask_refine": refine},
                             data=X)
        Q = pruned[0].weight.detach()
        kept = Q != 0
        assert torch.equal(Q[kept], W[kept])  # no weight update
        assert int((~kept).sum()) == W.numel() // 2
        errs[refine] = _err(X, W, Q)
    assert errs[16] < 0.9 * errs[0]


def test_wanda_ria_and_type_sparsity() -> None:
    X = _data()
    model = _net()
    ria = apply_prune(model, {"method": "wanda", "sparsity": 0.5, "score": "ria"}, data=X)
    plain = apply_prune(model, {"method": "wanda", "sparsity": 0.5}, data=X)
    assert int((ria[0].weight == 0).sum()) == int((plain[0].weight == 0).sum()) == 48 * 32
    assert not torch.equal(ria[0].weight == 0, plain[0].weight == 0)
    typed = apply_prune(model, {"method": "wanda", "sparsity": 0.5,
                                "type_sparsity": {"0": 0.25, "re:2": 0.75}}, data=X)
    assert int((typed[0].weight == 0).sum()) == 64 * 12
    assert int((typed[2].weight == 0).sum()) == 32 * 48


def test_wanda_dense_target_refits_norms_and_biases_only() -> None:
    X = _data()
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = {"method": "wanda", "sparsity": 0.5, "bias_correction": True}
    base = apply_prune(model, cfg, data=X)
    full = apply_prune(model, {**cfg, "target": "dense", "refit_norms": True, "mask_refine": 16},
                       data=X)
    for k in ("0.weight", "2.weight"):
        w = full.state_dict()[k]
        assert torch.equal(w[w != 0], before[k][w != 0])  # kept weights unchanged
    assert not torch.equal(full[1].weight, before["1.weight"])  # the LayerNorm was refit
    with torch.no_grad():
        ref = model(X)
        e_base = float((base(X) - ref).square().mean())
        e_full = float((full(X) - ref).square().mean())
    assert e_full < e_base


def test_wanda_option_errors() -> None:
    X = _data()
    for bad in ({"refit_norms": True}, {"mask_refine": 4, "scope": "global"},
                {"type_sparsity": {"0": 1.5}}, {"sparsity": "2:4", "type_sparsity": {"0": 0.5}}):
        cfg = {"method": "wanda", "sparsity": 0.5, **bad}
        with pytest.raises(RecipeError):
            apply_prune(_net(), cfg, data=X)


def test_row_masks_remove_the_exact_layer_count_for_fractional_rows() -> None:
    score = torch.rand(7, 384, generator=torch.Generator().manual_seed(0))
    for p in (0.65, 0.4, 0.525, 0.5):
        pruned = (~row_masks(score, p)).sum(1)
        assert int(pruned.sum()) == int(p * 7 * 384 + 1e-6)
        assert int(pruned.max() - pruned.min()) <= 1
