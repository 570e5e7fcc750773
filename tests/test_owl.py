"""Sequential Wanda and OWL (outlier-weighted layer-wise sparsity) for Wanda / SparseGPT."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from netpress.api import prune as apply_prune
from netpress.core.errors import RecipeError
from netpress.prune.owl import block_of, outlier_ratio, owl_sparsities
from netpress.prune.scores import row_masks

pytestmark = pytest.mark.usefixtures("one_thread")


class Blocks(nn.Module):
    """Two numbered blocks of two Linears (32 and 64 inputs, like BERT's 384 / 1536); block 1
    sees a few huge ("outlier") features."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            nn.ModuleDict({"a": nn.Linear(32, 64), "b": nn.Linear(64, 32)}) for _ in range(2))
        self.scale = nn.Parameter(torch.ones(32), requires_grad=False)
        with torch.no_grad():
            self.scale[:2] = 40.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, blk in enumerate(self.layer):
            x = blk["b"](torch.relu(blk["a"](x)))
            if i == 0:
                x = x * self.scale
        return x


def test_owl_formula_keeps_the_mean_and_favours_outlier_blocks():
    s = owl_sparsities({"l.0": 0.0, "l.1": 0.02, "l.2": 0.04}, dict.fromkeys(["l.0", "l.1", "l.2"],
                       10), 0.5, lam=0.1)
    assert s["l.0"] == pytest.approx(0.6) and s["l.1"] == pytest.approx(0.5)
    assert s["l.2"] == pytest.approx(0.4)
    # unequal sizes: the weighted mean is still the target
    s2 = owl_sparsities({"a.0": 0.0, "a.1": 1.0}, {"a.0": 30, "a.1": 10}, 0.5, lam=0.08)
    assert (30 * s2["a.0"] + 10 * s2["a.1"]) / 40 == pytest.approx(0.5)
    assert owl_sparsities({"x.0": 0.3}, {"x.0": 5}, 0.5, 0.1) == {"x.0": 0.5}
    assert block_of("bert.encoder.layer.11.output.dense") == "bert.encoder.layer.11"
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 1.0])], 2.0) == 0.0


def test_wanda_owl_moves_sparsity_between_blocks_and_keeps_the_total():
    torch.manual_seed(0)
    model = Blocks()
    X = torch.randn(256, 32)
    cfg = {"method": "wanda", "sparsity": 0.5, "owl_lambda": 0.1, "owl_m": 3.0}
    out = apply_prune(model, cfg, data=X)
    zeros = {i: sum(int((out.layer[i][k].weight == 0).sum()) for k in "ab") for i in range(2)}
    assert sum(zeros.values()) == 2 * 2 * 32 * 64 // 2  # exactly 50% overall (equal blocks)
    assert zeros[0] != zeros[1]  # non-uniform
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(RecipeError):
            apply_prune(model, {"method": method, "sparsity": "2:4", "owl_lambda": 0.1}, data=X)


def test_sequential_wanda_scores_the_pruned_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    X = torch.randn(128, 16)
    seq = apply_prune(model, {"method": "wanda", "sparsity": 0.5, "sequential": True}, data=X)
    one = apply_prune(model, {"method": "wanda", "sparsity": 0.5}, data=X)
    assert torch.equal(seq[0].weight, one[0].weight)  # the first layer sees the same inputs
    with torch.no_grad():
        h_pruned = torch.relu(seq[0](X))  # (128, 32): what layer 2 sees after layer 1 is pruned
        h_dense = torch.relu(model[0](X))
    for h, net in ((h_pruned, seq), (h_dense, one)):
        score = model[2].weight.abs() * h.norm(dim=0).reshape(1, -1)  # (8, 32)
        assert torch.equal(net[2].weight != 0, row_masks(score, 0.5))
    assert not torch.equal(seq[2].weight, one[2].weight)


def test_wanda_bias_correction_removes_the_mean_output_shift():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    X = torch.randn(256, 32) + 2.0  # non-zero mean inputs
    plain = apply_prune(model, {"method": "wanda", "sparsity": 0.5}, data=X)
    fixed = apply_prune(model, {"method": "wanda", "sparsity": 0.5, "bias_correction": True},
                        data=X)
    assert torch.equal(plain[0].weight, fixed[0].weight)  # same masks, only biases move
    with torch.no_grad():
        ref, a, b = model(X), plain(X), fixed(X)
        shift_plain = float((a - ref).mean(0).abs().mean())
        shift_fixed = float((b - ref).mean(0).abs().mean())
        err_plain, err_fixed = float((a - ref).square().mean()), float((b - ref).square().mean())
    assert shift_fixed < 0.5 * shift_plain and err_fixed < err_plain, (shift_plain, shift_fixed)
