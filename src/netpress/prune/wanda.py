"""Wanda (Sun et al. 2023, SPEC P3): prune by ``|w_ij| · ‖x_j‖₂`` within each output row.

A pre-forward hook accumulates the squared norm of each input feature over all (non-padding)
tokens; then each output row loses its ``floor(p·in)`` lowest-scoring weights (``scope: row``, the
paper's comparison group), or the scores are ranked per layer / globally, or by N:M groups. No
weight update, no fine-tuning.

``sequential: true`` (as in the paper's code) prunes the layers one at a time in definition
order, each from inputs that flow through the *already pruned* earlier layers (block-cached
runs, :func:`netpress.prune.scores.sequential_runs`); ``false`` (the default) takes every norm
from one pass of the dense model (also forced by ``scope: global``). On MiniLM at 50% (192
held-out sentences) the sequential variant measured cosine 0.8706 vs 0.8736 for one pass.
``update: obs`` keeps Wanda's mask but updates the kept weights with SparseGPT's OBS sweep on the
layer Hessian (sequential; then it is no longer "pruning without weight update").
``owl_lambda`` > 0 makes the sparsity non-uniform across blocks (OWL,
:mod:`netpress.prune.owl`) with the same overall fraction. ``bias_correction: true`` then adds
``(W - W_pruned)·mean(x)`` to each pruned layer's bias, ``mean(x)`` over the calibration inputs
that reach it through the pruned model (the mean output shift removed; MiniLM 50%, 192 held-out
sentences: cosine 0.8736 -> 0.8930, 2:4 0.7501 -> 0.7883).

Training-free mask options (the kept weights keep their dense values, :mod:`netpress.prune.wanda_mask`):
``score: ria`` ranks by RIA's relative importance instead of ``|w|·‖x‖``; ``mask_refine: K`` (implies
sequential) then swaps up to ``K`` pruned/kept pairs per row while the row's reconstruction error
``dᵀ C d`` falls (a DSnoT-style search on the exact quadratic error); ``type_sparsity`` sets the
fraction per layer type. ``target: dense`` (sequential, a dense copy alongside) makes the mask
search and the bias correction aim at the *dense model's* outputs, and ``refit_norms`` then refits
each LayerNorm after a pruned layer to them (closed form; touches norms and biases only).
MiniLM 50%, 1,124 calibration / 573 held-out sentences (cosine): plain 0.8726, ``score: ria``
0.8725, per-type split 0.8840, bias correction 0.8891, sequential + bias 0.8718, dense target +
LayerNorm refit + bias 0.8969, the same + ``mask_refine: 64`` 0.9569, + ``mask_refine: 256``,
``mask_candidates: 4`` and the per-type split 0.9582.

Example:
    >>> import torch, torch.nn as nn, netpress
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 4))
    >>> X = torch.randn(32, 8) * torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 0.01])
    >>> pruned = netpress.prune(model, {"method": "wanda", "sparsity": 0.5}, data=X)
    >>> (pruned[0].weight[:, 0] != 0).all().item(), (pruned[0].weight[:, 7] == 0).all().item()
    (True, True)
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.errors import RecipeError
from netpress.prune.nm import check_nm_shape
from netpress.prune.options import NMFields
from netpress.prune.owl import OWLFields, layer_sparsities, type_sparsities
from netpress.prune.scores import (
    apply_masks,
    calibration_data,
    capture_inputs,
    masks_from_scores,
    prunable,
    row_masks,
    sequential_runs,
    summary,
)
from netpress.prune.wanda_mask import refine_mask, ria_score


class WandaPruneConfig(NMFields, OWLFields, TechniqueConfig):
    """Config of ``wanda`` pruning.

    Attributes:
        sparsity: fraction removed in [0, 1), or ``"2:4"`` / ``"4:8"`` (also ``n``, ``m``).
        scope: ``row`` (per output row, the paper's choice), ``layer`` or ``global``.
        sequential: prune layer by layer from the pruned earlier layers' outputs.
        bias_correction: move each layer's mean output shift into its bias (layers with a bias).
        update: ``none`` (Wanda: no weight update) or ``obs``: keep Wanda's mask but update the
            kept weights with SparseGPT's OBS sweep (implies sequential; ``damp`` as SparseGPT's).
        owl_lambda / owl_m: outlier-weighted block sparsities (0 = uniform).
        score: ``wanda`` (``|w|·‖x‖``) or ``ria`` (relative importance · ``‖x‖^ria_alpha``).
        mask_refine: swaps per row of the mask search (0 = off; implies sequential).
        mask_candidates: grow candidates the search tries per row and step (best pair wins).
        type_sparsity: ``{pattern: fraction}`` per layer type (first match wins), as SparseGPT's.
        target: ``weights`` or ``dense`` (the mask search and bias correction fit the dense
            model's outputs, from a dense copy run alongside; implies sequential).
        refit_norms: with ``target: dense``, refit each LayerNorm after a pruned layer.
        max_batches: use at most this many calibration batches.
        targets / ignore: module patterns (default: Linear, Conv1d, Conv2d).
    """

    method: Literal["wanda"] = "wanda"
    scope: Literal["row", "layer", "global"] = "row"
    sequential: bool = False
    bias_correction: bool = False
    update: Literal["none", "obs"] = "none"
    damp: float = Field(default=0.01, gt=0.0, le=1.0)
    score: Literal["wanda", "ria"] = "wanda"
    ria_alpha: float = Field(default=0.5, ge=0.0, le=2.0)
    mask_refine: int = Field(default=0, ge=0, le=100000)
    mask_candidates: int = Field(default=1, ge=1, le=64)
    type_sparsity: dict[str, float] = Field(default_factory=dict)
    target: Literal["weights", "dense"] = "weights"
    refit_norms: bool = False
    max_batches: int | None = Field(default=None, ge=1)
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_target(self) -> WandaPruneConfig:
        if (self.sparsity is None) == (self.n is None):
            raise ValueError("give exactly one of `sparsity` (e.g. 0.5) or an N:M pattern "
                             "(sparsity: '2:4')")
        if self.owl_lambda and (self.nm is not None or self.scope == "global"):
            raise ValueError("owl_lambda needs a fractional sparsity with scope row or layer "
                             "(N:M and global scope fix the per-layer fraction); set owl_lambda: 0")
        if self.scope == "global" and (self.update == "obs" or self.mask_refine
                                       or self.target == "dense"):
            raise ValueError("update: obs, mask_refine and target: dense work layer by layer; "
                             "use scope: row or layer")
        if self.refit_norms and self.target != "dense":
            raise ValueError("refit_norms fits the dense model's LayerNorm outputs; "
                             "it needs target: dense")
        if self.type_sparsity and (self.nm is not None or self.owl_lambda
                                   or self.scope == "global"):
            raise ValueError("type_sparsity needs a fractional sparsity, scope row or layer and "
                             "owl_lambda: 0")
        bad = {k: v for k, v in self.type_sparsity.items() if not 0.0 <= v < 1.0}
        if bad:
            raise ValueError(f"type_sparsity fractions must be in [0, 1), got {bad}")
        return self

    @property
    def layerwise(self) -> bool:
        """Whether the layers are pruned one at a time from the pruned earlier layers."""
        return self.scope != "global" and (
            self.sequential or self.update == "obs" or self.mask_refine > 0
            or self.target == "dense")


def input_norms(
    model: nn.Module, modules: list[tuple[str, nn.Module]], batches: list,
    stop_after: bool = False,
) -> dict[str, torch.Tensor]:
    """``‖x_j‖₂`` of every input column of every layer over all calibration rows: ``(in·k,)``.

    ``stop_after`` (one layer): the forward passes stop right after it.
    """
    sq: dict[str, torch.Tensor] = {}

    def add(name: str, rows: torch.Tensor) -> None:  # rows (N, cols)
        s = rows.square().sum(0, dtype=torch.float64)  # (cols,)
        sq[name] = sq[name] + s if name in sq else s

    capture_inputs(model, modules, batches, add, stop_after=stop_after)
    return {k: v.sqrt().to(torch.float32) for k, v in sq.items()}


def correct_bias(model: nn.Module, modules: list[tuple[str, nn.Module]],
                 dense: dict[str, torch.Tensor], batches: list) -> None:
    """``bias += (W_dense - W) · mean(x)`` for every layer with a bias, ``x`` its calibration
    inputs through ``model`` as it is now (one pass, padding tokens excluded).

    Example:
        >>> from netpress.core.data import Batch
        >>> lin = nn.Linear(2, 1); X = torch.randn(8, 2)
        >>> with torch.no_grad(): dense_out = lin(X).mean()
        >>> W = lin.weight.detach().clone()
        >>> with torch.no_grad(): _ = lin.weight.zero_()  # everything pruned
        >>> correct_bias(lin, [("", lin)], {"": W}, [Batch((X,))])
        >>> with torch.no_grad(): bool(torch.isclose(lin(X).mean(), dense_out, atol=1e-5))
        True
    """
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def add(name: str, rows: torch.Tensor) -> None:  # rows (N, cols)
        sums[name] = sums[name] + rows.sum(0, dtype=torch.float64) if name in sums \
            else rows.sum(0, dtype=torch.float64)
        count[name] = count.get(name, 0) + rows.shape[0]

    capture_inputs(model, modules, batches, add)
    with torch.no_grad():
        for name, module in modules:
            bias = getattr(module, "bias", None)
            if bias is None or name not in sums:
                continue
            mu = (sums[name] / max(count[name], 1)).to(torch.float32)  # (in·k,)
            delta = (dense[name] - module.weight).reshape(module.weight.shape[0], -1)  # (out, in·k)
            bias.add_((delta @ mu).to(bias.dtype))


def _score(w: torch.Tensor, norm: torch.Tensor, config: WandaPruneConfig) -> torch.Tensor:
    """Importance of every weight (shaped like ``w``): Wanda's ``|w|·‖x‖`` or RIA's."""
    if config.score == "ria":
        return ria_score(w.reshape(w.shape[0], -1), norm, config.ria_alpha).reshape(w.shape)
    return w.abs() * norm.reshape((1,) + tuple(w.shape[1:]))


def _mask(module: nn.Module, norm: torch.Tensor, name: str, config: WandaPruneConfig,
          sparsity: float) -> torch.Tensor | None:
    """Keep-mask of one layer from its input norms (``None`` for global scope)."""
    w = module.weight.detach().to(torch.float32)
    score = _score(w, norm, config)  # (out, in, *k)
    if config.nm is None and config.scope == "row":
        return row_masks(score, sparsity)
    if config.nm is not None or config.scope == "layer":
        return masks_from_scores([(name, score)], sparsity, "layer", config.nm)[0]
    return None


def _sequential(model: nn.Module, modules: list[tuple[str, nn.Module]], batches: list,
                config: WandaPruneConfig, spars: dict[str, float]) -> dict[str, dict]:
    """Layer by layer: norms (and ``XᵀX`` for ``update: obs`` / ``mask_refine``) from the inputs
    through the pruned earlier layers, block-cached (:func:`netpress.prune.scores.sequential_runs`);
    with ``target: dense`` a dense copy runs alongside for the dense outputs."""
    from netpress.prune.sparsegpt import (
        _norms_after,
        dense_target,
        layer_stats,
        refit_norm,
        sparsegpt_prune,
    )

    layers: dict[str, dict] = {}
    swaps: dict[str, int] = {}
    dense_steps, ref_names = None, {}
    if config.target == "dense":
        ref = copy.deepcopy(model)
        ref_names = dict(ref.named_modules())
        dense_steps = sequential_runs(ref, [(n, ref_names[n]) for n, _ in modules], batches)
    by_model = dict(model.named_modules())
    norms_after = _norms_after(model, [n for n, _ in modules]) if config.refit_norms else {}
    for name, module, runs in sequential_runs(model, modules, batches):
        ref_step = next(dense_steps) if dense_steps is not None else None
        st = layer_stats(runs, name, module, *(ref_step[2], ref_step[1]) if ref_step else ())
        H, mean = st["H"], st["mean"]
        mean_d = st.get("mean_dense", mean)
        norm = (torch.diag(H).clamp_min(0) * (int(st["n"]) / 2)).sqrt()  # ‖x_j‖₂ = sqrt(Σ x_j²)
        keep = _mask(module, norm, name, config, spars[name])
        assert keep is not None  # global scope never runs sequentially
        w = module.weight
        dense = w.detach().reshape(w.shape[0], -1).to(torch.float32)  # (out, in·k)
        keep = keep.reshape(dense.shape)
        C, G = H, st.get("G")
        if config.bias_correction:  # the bias absorbs the mean: fit the centred outputs
            C = H - 2 * torch.outer(mean, mean)
            G = None if G is None else G - 2 * torch.outer(mean_d, mean)
        goal = dense_target(dense, C, G, config.damp) if G is not None else dense
        if config.mask_refine:
            keep, swaps[name] = refine_mask(dense, goal, keep, C, config.mask_refine,
                                            candidates=config.mask_candidates)
        if config.update == "obs":  # Wanda's mask, the kept weights updated as in SparseGPT
            new, _ = sparsegpt_prune(goal, H, prune_mask=~keep, damp=config.damp)
        else:
            new = dense.masked_fill(~keep, 0.0)
        with torch.no_grad():
            w.copy_(new.reshape(w.shape).to(w.dtype))
            bias = getattr(module, "bias", None)
            if config.bias_correction and bias is not None:
                bias.add_((dense @ mean_d - new @ mean).to(bias.dtype))
        layers[name] = {"numel": w.numel(), "zeros": int((w == 0).sum())}
        if config.refit_norms and ref_step is not None:
            for ln_name in norms_after.get(name, []):
                refit_norm(runs, ref_step[2], ln_name, by_model[ln_name], ref_names[ln_name])
    return {"layers": layers, "swaps": swaps}


@register("prune", "wanda", WandaPruneConfig,
          summary="Wanda: |w|·‖x‖ per output row from one calibration pass (no weight update)")
def prune_wanda(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Zero the weights with the lowest ``|w|·‖x‖`` in each output row (or N:M group), in place.

    Args:
        model: modified and returned.
        config: a :class:`WandaPruneConfig`.
        ctx: ``ctx.data`` holds the calibration batches.

    Returns:
        ``model`` with exact zeros.

    Raises:
        DataError: no calibration data. RecipeError: bad targets, a layer the calibration never
            reached, or N:M on an input size not divisible by M (names the layer and the fix).
    """
    assert isinstance(config, WandaPruneConfig)
    modules = prunable(model, config.targets, config.ignore, "prune.wanda")
    batches = calibration_data(ctx, "wanda")[: config.max_batches]
    if config.nm is not None:
        for name, m in modules:
            check_nm_shape(tuple(m.weight.shape), config.nm[1], name)
    sequential = config.layerwise
    spars = layer_sparsities(model, modules, batches, float(config.sparsity or 0.0),
                             config.owl_lambda, config.owl_m)
    spars = type_sparsities(spars, modules, config.type_sparsity, "prune.wanda.type_sparsity")
    swaps: dict[str, int] = {}
    if sequential:
        res = _sequential(model, modules, batches, config, spars)
        layers, swaps = res["layers"], res["swaps"]
    else:
        norms = input_norms(model, modules, batches)
        dense = {name: m.weight.detach().clone() for name, m in modules} \
            if config.bias_correction else {}
        scores, masks = [], []
        for name, module in modules:
            if name not in norms:
                raise RecipeError(name, got="a layer the calibration forward pass never called",
                                  expected="layers used by model(inputs)",
                                  fix=f"add {name!r} to `ignore`")
            mask = _mask(module, norms[name], name, config, spars[name])
            if mask is None:  # global scope: rank everything at once
                w = module.weight.detach().to(torch.float32)
                scores.append((name, _score(w, norms[name], config)))
            else:
                masks.append(mask)
        if scores:
            masks = masks_from_scores(scores, config.sparsity, config.scope, config.nm)
        layers = apply_masks(modules, masks)
        if config.bias_correction:
            correct_bias(model, modules, dense, batches)
    ctx.report["wanda"] = summary(layers, scope=config.scope, batches=len(batches),
                                  sequential=sequential, update=config.update,
                                  score=config.score, target=config.target,
                                  mask_swaps=swaps or None,
                                  layer_sparsity=spars if config.owl_lambda
                                  or config.type_sparsity else None,
                                  nm=f"{config.n}:{config.m}" if config.nm else None)
    return model


__all__ = ["WandaPruneConfig", "correct_bias", "input_norms", "prune_wanda"]
