"""SVD of Linear layers (SPEC L1): ``lowrank: {method: svd, energy: 0.9 | ratio: 0.5 | rank: 64}``.

``W (O, I) ≈ U_r·Σ_r·V_rᵀ`` becomes two plain Linear layers ``Sequential(Linear(I, r, bias=False),
Linear(r, O))`` with weights ``√Σ_r·V_rᵀ (r, I)`` and ``U_r·√Σ_r (O, r)`` (the bias stays on the
second). The rank comes from exactly one of

  * ``energy``: the smallest ``r`` keeping that fraction of ``Σ σ_i²``;
  * ``ratio``: the largest ``r`` with ``r·(I + O) <= ratio·I·O`` (the layer keeps ``ratio`` of its
    weights);
  * ``rank``: a fixed ``r`` (more than ``min(O, I)`` is a :class:`RecipeError` naming the layer).

With ``activation_aware: true`` the truncation is weighted by the layer's real inputs (calibration
data; SVD-LLM style whitening, layers in forward order, each corrected for the error of the ones
before it; see :mod:`netpress.lowrank.whiten`; inside a layer stack the statistics run block by
block, :mod:`netpress.lowrank.sequential`). ``statistics: train`` takes them from the run's
``train`` split (thousands of sentences rather than 100 calibration ones: the 1536-dim moments of
a BERT FFN over-fit 100 sentences). A layer whose chosen rank saves nothing
(``r·(I+O) >= I·O``) is left dense and listed in the report.
``distill: {...}`` then trains the factors (and LayerNorms / biases) to reproduce the original
model's block outputs and pooled embedding on the run's ``train`` split (calibration data when there
is none); see :mod:`netpress.lowrank.hidden_kd`. With ``ratio`` and ``allocation: energy`` the
layers share one weight budget and the ranks follow their (whitened) spectra
(:mod:`netpress.lowrank.allocate`).
The result reloads from the artifact (plain ``Sequential``/``Linear`` specs).

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.api import apply
    >>> _ = torch.manual_seed(0)
    >>> m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> out = apply("lowrank", m, {"method": "svd", "ratio": 0.5, "targets": ["0"]})
    >>> [type(l).__name__ for l in out[0]], out[0][0].out_features   # 16·128 <= 0.5·4096
    (['Linear', 'Linear'], 16)
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.errors import DataError, RecipeError
from netpress.core.targeting import select
from netpress.lowrank.allocate import allocate_ranks, input_moments
from netpress.lowrank.common import energy_rank, recover, set_module
from netpress.lowrank.hidden_kd import HiddenDistillConfig, hidden_distill
from netpress.lowrank.sequential import SequentialMoments
from netpress.lowrank.whiten import corrected_weight, whitened_factors
from netpress.train.loop import TrainConfig


class SvdConfig(TechniqueConfig):
    """Config of ``lowrank: {method: svd}``.

    Attributes:
        energy: keep this fraction of the squared singular values, in (0, 1].
        ratio: keep this fraction of each layer's weights, in (0, 1).
        rank: a fixed rank for every targeted layer.
        targets, ignore: module patterns (default targets: every Linear).
        activation_aware: whiten by the input second moment on the calibration data.
        damping: diagonal damping of that moment (times its mean diagonal).
        correct: activation-aware only: layers one after another, each fitted to the inputs the
            compressed layers before it produce (block by block in a layer stack); ``false``: every
            layer whitened by the original model's inputs, all moments from one pass (fast on
            large calibration sets).
        finetune: optional :class:`TrainConfig` run after decomposition.
        allocation: ``uniform`` (every layer keeps ``ratio``) or ``energy`` (one shared budget of
            ``ratio`` of the targeted weights, ranks by normalised singular-value energy).
        distill: optional hidden-state distillation from the original after decomposition
            (:class:`~netpress.lowrank.hidden_kd.HiddenDistillConfig`).
        statistics: activation-aware only: the data of the input moments, ``calibration`` (the
            stage's data) or ``train`` (the run's train split; calibration when there is none).
    """

    method: Literal["svd"] = "svd"
    energy: float | None = Field(default=None, gt=0, le=1)
    ratio: float | None = Field(default=None, gt=0, lt=1)
    rank: int | None = Field(default=None, ge=1)
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)
    activation_aware: bool = False
    damping: float = Field(default=0.01, gt=0, le=10)
    correct: bool = True
    finetune: TrainConfig | None = None
    allocation: Literal["uniform", "energy"] = "uniform"
    distill: HiddenDistillConfig | None = None
    statistics: Literal["calibration", "train"] = "calibration"

    @model_validator(mode="after")
    def _one_mode(self) -> SvdConfig:
        if sum(v is not None for v in (self.energy, self.ratio, self.rank)) != 1:
            raise ValueError("give exactly one of energy, ratio or rank")
        if self.allocation == "energy" and self.ratio is None:
            raise ValueError("allocation: energy shares a ratio budget; give ratio")
        return self


def svd_rank(sigma: torch.Tensor, out_f: int, in_f: int, config: SvdConfig, name: str) -> int:
    """The rank for one layer (see the module doc).

    Raises:
        RecipeError: a fixed rank larger than ``min(O, I)``.
    """
    full = min(out_f, in_f)
    if config.rank is not None:
        if config.rank > full:
            raise RecipeError(f"lowrank.rank for layer {name!r}", got=config.rank,
                              expected=f"at most min(out, in) = {full} for its ({out_f}, {in_f}) weight",
                              fix=f"lower the rank, use ratio/energy, or add {name!r} to ignore")
        return config.rank
    if config.energy is not None:
        return min(full, energy_rank(sigma, config.energy))
    assert config.ratio is not None
    return max(1, min(full, int(config.ratio * out_f * in_f // (out_f + in_f))))


def factorize_linear(lin: nn.Linear, rank: int) -> nn.Sequential:
    """``Sequential(Linear(I, r, bias=False), Linear(r, O))`` from the rank-``r`` truncated SVD."""
    w = lin.weight.detach().double()  # (O, I)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (O, k), (k,), (k, I)
    root = s[:rank].sqrt()
    first = nn.Linear(lin.in_features, rank, bias=False)
    second = nn.Linear(rank, lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:rank]).float())  # (r, I)
        second.weight.copy_((u[:, :rank] * root[None, :]).float())  # (O, r)
        if lin.bias is not None:
            second.bias.copy_(lin.bias.detach())
    return nn.Sequential(first, second).to(lin.weight.device)


def _chol(cc: torch.Tensor, damping: float) -> torch.Tensor:
    eye = torch.eye(cc.shape[0], dtype=cc.dtype, device=cc.device)
    return torch.linalg.cholesky(cc + damping * cc.diagonal().mean().clamp(min=1e-12) * eye)


def _from_factors(lin: nn.Linear, first_w: torch.Tensor, second_w: torch.Tensor) -> nn.Sequential:
    rank = first_w.shape[0]
    first = nn.Linear(lin.in_features, rank, bias=False)
    second = nn.Linear(rank, lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if lin.bias is not None:
            second.bias.copy_(lin.bias.detach())
    return nn.Sequential(first, second).to(lin.weight.device)


def _allocate(model: nn.Module, chosen: list[tuple[str, nn.Linear]], config: SvdConfig,
              stats: list, moments: dict[str, torch.Tensor]) -> dict[str, int]:
    """Ranks under one shared budget (spectra of ``W`` or, activation-aware, of ``W·S``)."""
    assert config.ratio is not None
    if config.activation_aware and not moments:
        moments = input_moments(model.eval(), [n for n, _ in chosen], stats)
    sigmas = {}
    for name, lin in chosen:
        w = lin.weight.detach().double()
        sigmas[name] = torch.linalg.svdvals(w @ _chol(moments[name], config.damping)
                                            if name in moments else w)
    return allocate_ranks(sigmas, {n: tuple(m.weight.shape) for n, m in chosen}, config.ratio)


@register("lowrank", "svd", SvdConfig,
          summary="SVD of Linear layers into two thin Linears; rank from energy, ratio or fixed")
def lowrank_svd(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Registered handler: factorise every targeted Linear (see the module doc)."""
    assert isinstance(config, SvdConfig)
    chosen = [(n, m) for n, m in select(model, config.targets, config.ignore, default=(nn.Linear,),
                                        where="lowrank.targets") if isinstance(m, nn.Linear)]
    ranks, kept = {}, []
    original = None
    teacher = ctx.original if ctx.original is not None else (
        copy.deepcopy(model).eval() if config.distill is not None else None)
    advanced = ctx.advanced if isinstance(ctx.advanced, dict) else {}
    stats = (advanced.get("train") or ctx.data) if config.statistics == "train" else ctx.data
    if config.activation_aware:
        if not stats:
            raise DataError("lowrank.activation_aware", got="no calibration data",
                            expected="calibration batches", fix="use a zoo data set, or "
                            "activation_aware: false")
        original = copy.deepcopy(model).eval() if config.correct else None
    shared = (input_moments(model.eval(), [n for n, _ in chosen], stats or [])
              if config.activation_aware and not config.correct else {})
    stream = (SequentialMoments(model.eval(), original, [n for n, _ in chosen], stats or [])
              if original is not None else None)
    preset = (_allocate(model, chosen, config, stats or [], shared)
              if config.allocation == "energy" else {})
    for name, lin in chosen:
        out_f, in_f = lin.weight.shape
        w, cc = lin.weight.detach().double(), None
        if name in shared:
            cc = shared[name]
            sigma = torch.linalg.svdvals(w @ _chol(cc, config.damping))
        elif stream is not None:
            cc, oc, _ = stream.moments(name)
            w = corrected_weight(w, cc, oc, config.damping)
            sigma = torch.linalg.svdvals(w @ _chol(cc, config.damping))
        else:
            sigma = torch.linalg.svdvals(w)  # (min(O, I),)
        r = preset[name] if preset else svd_rank(sigma, out_f, in_f, config, name)
        if r * (out_f + in_f) >= out_f * in_f:
            kept.append(name)
            continue
        if cc is None:
            set_module(model, name, factorize_linear(lin, r))
        else:
            set_module(model, name, _from_factors(lin, *whitened_factors(w, cc, r, config.damping)))
        ranks[name] = r
    ctx.report.update(ranks=ranks, left_dense=kept)
    ctx.report.update(recover(model, ctx, config.finetune, "lowrank"))
    if config.distill is not None and ranks:
        data = advanced.get("train") or ctx.data
        res = hidden_distill(model, teacher, data or [], config.distill, list(ranks))
        ctx.report.update(distill_steps=res.steps, distill_losses=[round(v, 5) for v in res.losses],
                          distill_blocks=res.blocks, distill_params=res.trained_params)
    return model


__all__ = ["SvdConfig", "factorize_linear", "lowrank_svd", "svd_rank"]
