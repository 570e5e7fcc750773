"""SparseGPT / Wanda sequential paths: block-cached inputs, dense target, LayerNorm refit, OBS update,
exact refit of the kept weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from netpress.api import prune as apply_prune
from netpress.core.data import Batch
from netpress.core.errors import RecipeError
from netpress.prune.sparsegpt import layer_hessian, refit_kept, sparsegpt_prune

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """A residual MLP block with a post-LayerNorm, like a transformer's FFN half."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))) * scale)


class Net(nn.Module):
    def __init__(self, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        scale = torch.ones(())
        for b in self.blocks:
            h = b(h, scale)
        return h


def _data(n: int = 4, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch((torch.randn(64, 8, generator=g) * torch.linspace(0.2, 3.0, 8),))
            for _ in range(n)]


def _err(model: nn.Module, ref: nn.Module, data: list[Batch]) -> float:
    with torch.no_grad():
        return float(sum((b.run(model) - b.run(ref)).square().mean() for b in data))


def test_block_cached_inputs_match_whole_model_forwards() -> None:
    torch.manual_seed(0)
    net, data = Net(), _data()
    pruned = apply_prune(copy.deepcopy(net), {"method": "sparsegpt", "sparsity": 0.5}, data=data)
    # the plain path: every layer from a forward of the whole (partly pruned) model
    plain = copy.deepcopy(net)
    for name, module in plain.named_modules():
        if isinstance(module, nn.Linear):
            H, _ = layer_hessian(plain, name, module, data)
            W, _ = sparsegpt_prune(module.weight.detach(), H, sparsity=0.5)
            with torch.no_grad():
                module.weight.copy_(W)
    for (name, a), b in zip(pruned.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_dense_target_and_norm_refit_lower_the_model_error() -> None:
    torch.manual_seed(0)
    net, data, held = Net(), _data(), _data(seed=1)
    errs = {}
    for key, extra in (("weights", {}), ("dense", {"target": "dense"}),
                       ("refit", {"target": "dense", "refit_norms": True})):
        pruned = apply_prune(copy.deepcopy(net), {"method": "sparsegpt", "sparsity": 0.6, **extra},
                             data=data)
        for name, m in pruned.named_modules():
            if isinstance(m, nn.Linear):
                assert int((m.weight == 0).sum()) == int(0.6 * m.weight.numel()), name
        errs[key] = _err(pruned, net, held)  # on held-out inputs
    assert errs["dense"] < errs["weights"], errs
    assert errs["refit"] < errs["weights"], errs


def test_refit_norms_needs_dense_target() -> None:
    with pytest.raises(RecipeError, match="target"):
        apply_prune(Net(), {"method": "sparsegpt", "sparsity": 0.5, "refit_norms": True},
                    data=_data(1))


def test_wanda_obs_update_keeps_the_wanda_mask_and_lowers_the_error() -> None:
    torch.manual_seed(0)
    net, data, held = Net(), _data(), _data(seed=1)
    seq = apply_prune(copy.deepcopy(net), {"method": "wanda", "sparsity": 0.5, "sequential": True},
                      data=data)
    obs = apply_prune(copy.deepcopy(net), {"method": "wanda", "sparsity": 0.5, "update": "obs"},
                      data=data)
    first = "inp"  # the first layer sees the same inputs in both: the same Wanda mask
    assert torch.equal(seq.get_submodule(first).weight == 0, obs.get_submodule(first).weight == 0)
    for m in obs.modules():
        if isinstance(m, nn.Linear):  # every row exactly half, as Wanda
            assert ((m.weight == 0).sum(1) == m.weight.shape[1] // 2).all()
    assert _err(obs, net, held) < _err(seq, net, held)



def _layer(cols: int = 48, rows: int = 20, n: int = 600, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    X[:, :3] *= 15.0  # outlier features
    return X, torch.randn(rows, cols, generator=g)


def _rel(X: torch.Tensor, W: torch.Tensor, Q: torch.Tensor) -> float:
    return float((X @ (W - Q).T).square().sum() / (X @ W.T).square().sum())


def test_refit_matches_per_row_least_squares_on_an_uneven_mask() -> None:
    X, W = _layer()
    H = 2 / X.shape[0] * X.T @ X
    g = torch.Generator().manual_seed(1)
    pruned = torch.rand(W.shape, generator=g) < torch.linspace(0.2, 0.8, W.shape[0]).unsqueeze(1)
    Q = refit_kept(W, H, pruned, damp=1e-8, chunk=7)  # chunks that split the rows unevenly
    assert torch.equal(Q == 0, pruned)
    for r in range(W.shape[0]):
        kept = ~pruned[r]
        ls = torch.linalg.lstsq(X[:, kept].double(), (X @ W[r]).double()).solution
        assert torch.allclose(Q[r, kept].double(), ls, atol=2e-3, rtol=1e-3), r


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"nm": (2, 4)}])
def test_refit_lowers_the_sweep_error_for_the_same_mask(pattern) -> None:
    X, W = _layer()
    H = 2 / X.shape[0] * X.T @ X
    Q, _ = sparsegpt_prune(W, H, **pattern)
    R = refit_kept(W, H, Q == 0, damp=0.01)
    assert torch.equal(Q == 0, R == 0)
    assert _rel(X, W, R) < 0.9 * _rel(X, W, Q), (_rel(X, W, R), _rel(X, W, Q))


def test_exact_refit_in_the_model_lowers_the_held_out_error() -> None:
    torch.manual_seed(0)
    net, data, held = Net(), _data(), _data(seed=1)
    errs = {}
    for key, extra in (("sweep", {}), ("exact", {"exact_refit": True})):
        pruned = apply_prune(copy.deepcopy(net), {"method": "sparsegpt", "sparsity": 0.5,
                                                  "target": "dense", **extra}, data=data)
        for name, m in pruned.named_modules():
            if isinstance(m, nn.Linear):
                assert int((m.weight == 0).sum()) == m.weight.numel() // 2, name
        errs[key] = _err(pruned, net, held)
    assert errs["exact"] < errs["sweep"], errs


def test_wanda_mask_option_keeps_wandas_row_counts_and_beats_plain_wanda() -> None:
    torch.manual_seed(0)
    net, data, held = Net(), _data(), _data(seed=1)
    plain = apply_prune(copy.deepcopy(net), {"method": "wanda", "sparsity": 0.5,
                                             "sequential": True}, data=data)
    wm = apply_prune(copy.deepcopy(net), {"method": "sparsegpt", "sparsity": 0.5, "mask": "wanda",
                                          "exact_refit": True}, data=data)
    # the first layer sees the same inputs in both: the same mask (Wanda's, per row)
    assert torch.equal(plain.inp.weight == 0, wm.inp.weight == 0)
    for m in wm.modules():
        if isinstance(m, nn.Linear):
            assert ((m.weight == 0).sum(1) == m.weight.shape[1] // 2).all()
    assert _err(wm, net, held) < _err(plain, net, held)


def test_type_sparsity_sets_the_fraction_per_layer_type_and_reports_it() -> None:
    from netpress.core.config import StageContext, get_technique, parse_config

    net, data = Net(), _data()
    conf = parse_config("prune", {"method": "sparsegpt", "sparsity": 0.5,
                                  "type_sparsity": {"re:blocks\\.\\d\\.fc1": 0.25,
                                                    "re:.*fc2": 0.75}})
    ctx = StageContext(data=data, original=net)
    pruned = get_technique("prune", "sparsegpt").handler(copy.deepcopy(net), conf, ctx)
    rep = ctx.report["sparsegpt"]
    assert rep["layer_sparsity"]["blocks.1.fc1"] == 0.25 and rep["layer_sparsity"]["inp"] == 0.5
    assert float((pruned.blocks[1].fc2.weight == 0).float().mean()) == 0.75
    # fc1 (2d x d) and fc2 (d x 2d) have the same size: the overall fraction stays 0.5
    assert abs(rep["sparsity"] - 0.5) < 0.01, rep["sparsity"]
    for bad in ({"type_sparsity": {"re:.*fc1": 1.0}},
                {"sparsity": "2:4", "type_sparsity": {"re:x": 0.5}}):
        with pytest.raises(RecipeError):
            apply_prune(copy.deepcopy(net), {"method": "sparsegpt", "sparsity": 0.5, **bad},
                        data=data)


def test_minilm_bench_variants_have_unique_rows_and_an_overall_half_type_split() -> None:
    from netpress.bench.prune_unstructured import MINILM_TYPES, TYPE_SPARSITY, _minilm_variants, _tag

    names = [f"{c}_{m}{_tag(e)[0]}" for c, _, m, e in _minilm_variants()]
    assert len(names) == len(set(names)), names
    sizes = {"query": 384 * 384, "key": 384 * 384, "value": 384 * 384, "attn_out": 384 * 384,
             "ffn_in": 1536 * 384, "ffn_out": 384 * 1536}  # MiniLM's Linear shapes
    removed = sum(sizes[k] * v for k, v in TYPE_SPARSITY.items())
    assert removed == pytest.approx(0.5 * sum(sizes.values()), rel=1e-12)
    assert set(MINILM_TYPES) == set(TYPE_SPARSITY)
