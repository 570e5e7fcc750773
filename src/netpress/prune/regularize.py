"""Regularisation-based pruning (SPEC P7): a sparsity penalty during fine-tuning, then prune.

* ``l1``: ``λ·Σ|w|`` on the targeted weights, then unstructured magnitude pruning (``sparsity``
  of the weights, layer or global);
* ``group_lasso``: ``λ·Σ_c ‖W_c‖₂`` over output channels (rows of ``weight.flatten(1)``), then
  the ``sparsity`` fraction of channels with the smallest ``‖W_c‖₂`` is zeroed;
* ``bn_gamma`` (network slimming, Liu et al. 2017): ``λ·Σ|γ|`` on BatchNorm scales, then the
  ``sparsity`` fraction of channels with the smallest ``|γ|`` is zeroed.

The penalty's (sub)gradient is added in the ``on_after_backward`` hook of the shared loop
:func:`netpress.train.fine_tune`. For the channel methods a zeroed channel has its filter, bias
and the BatchNorm ``γ``/``β`` that follow (or precede) it set to zero, so it outputs exact zeros;
it is **not** physically removed (that is ``prune: {method: structured}``), which
``ctx.report[method]["removed"]`` states. Every layer keeps at least one channel.

Example:
    >>> import torch, torch.nn as nn, netpress
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> X, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    >>> cfg = {"method": "group_lasso", "penalty": 1e-3, "sparsity": 0.25,
    ...        "finetune": {"epochs": 2}}
    >>> pruned = netpress.prune(model, cfg, data=(X, y))
    >>> int((pruned[0].weight.abs().sum(1) == 0).sum())  # 4 of 16 rows zeroed
    4
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.errors import RecipeError
from netpress.core.targeting import select
from netpress.prune.magnitude import keep_masks, prune_count
from netpress.prune.schedule import finetune_companions, finetune_loss, magnitude_scores
from netpress.prune.scores import (
    DEFAULT_TARGETS,
    MaskKeeper,
    apply_masks,
    calibration_data,
    masks_from_scores,
    prunable,
    summary,
)
from netpress.train.loop import TrainConfig, fine_tune

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


class RegularizePruneConfig(TechniqueConfig):
    """Config of ``l1``, ``group_lasso`` and ``bn_gamma``.

    Attributes:
        method: which penalty.
        penalty: ``λ``.
        sparsity: fraction of weights (``l1``) or channels (``group_lasso``, ``bn_gamma``) zeroed.
        scope: ``layer`` or ``global`` ranking (network slimming uses ``global``).
        finetune: the penalised fine-tuning run.
        targets / ignore: module patterns (default: Linear/Conv for ``l1`` and ``group_lasso``,
            BatchNorm1d/2d for ``bn_gamma``).
    """

    method: Literal["l1", "group_lasso", "bn_gamma"] = "l1"
    penalty: float = Field(default=1e-4, ge=0.0, le=10.0, allow_inf_nan=False)
    sparsity: float = Field(ge=0.0, lt=1.0, allow_inf_nan=False)
    scope: Literal["layer", "global"] = "global"
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=5, lr=1e-3))
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)


class Penalty:
    """``on_after_backward`` callback adding the penalty's (sub)gradient ``λ·∂R/∂θ``."""

    def __init__(self, kind: str, lam: float, modules: list[tuple[str, nn.Module]]):
        self.kind, self.lam, self.modules = kind, lam, modules

    def on_after_backward(self, step: int, model: nn.Module) -> None:
        with torch.no_grad():
            for _, m in self.modules:
                w = m.weight
                if w.grad is None:
                    continue
                if self.kind == "group_lasso":
                    rows = w.reshape(w.shape[0], -1)  # (C_out, in·k)
                    norm = rows.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (C_out, 1)
                    w.grad.add_((self.lam * rows / norm).reshape(w.shape))
                else:  # l1 on weights, or on BN γ
                    w.grad.add_(self.lam * torch.sign(w))


def bn_pairs(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """``{layer name: (bn name, bn)}`` for each BatchNorm directly after a Conv/Linear (by order).

    A BatchNorm is paired with the closest preceding Conv1d/Conv2d/Linear whose output size is its
    ``num_features``; that is how Sequential CNNs and torchvision blocks are written.
    """
    pairs: dict[str, tuple[str, nn.Module]] = {}
    last: tuple[str, nn.Module] | None = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            last = (name, m)
        elif isinstance(m, _BN) and last is not None:
            out = last[1].weight.shape[0]
            if out == m.num_features and last[0] not in pairs:
                pairs[last[0]] = (name, m)
            last = None
    return pairs


def channel_keep(scores: list[torch.Tensor], sparsity: float, scope: str) -> list[torch.Tensor]:
    """Keep-masks over channels; every layer keeps at least its best channel.

    Example:
        >>> [k.tolist() for k in channel_keep([torch.tensor([3.0, 1.0, 2.0])], 0.5, "layer")]
        [[True, False, True]]
    """
    if scope == "global":
        keep = keep_masks(scores, prune_count(sum(s.numel() for s in scores), sparsity))
    else:
        keep = [keep_masks([s], prune_count(s.numel(), sparsity))[0] for s in scores]
    for s, k in zip(scores, keep, strict=True):
        if not bool(k.any()):
            k[int(torch.argmax(s))] = True
    return keep


def zero_channels(layer: nn.Module | None, bn: nn.Module | None, keep: torch.Tensor) -> None:
    """Zero the dropped output channels of ``layer`` (weight rows, bias) and ``bn`` (γ, β)."""
    drop = ~keep  # (C,)
    with torch.no_grad():
        for mod, names in ((layer, ("weight", "bias")), (bn, ("weight", "bias"))):
            if mod is None:
                continue
            for attr in names:
                t = getattr(mod, attr, None)
                if isinstance(t, torch.Tensor):
                    t[drop] = 0.0


def _handler(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    assert isinstance(config, RegularizePruneConfig)
    where = f"prune.{config.method}"
    if config.method == "bn_gamma":
        modules = select(model, config.targets, config.ignore, default=_BN, where=f"{where}.targets")
        modules = [(n, m) for n, m in modules if isinstance(m, _BN) and m.affine]
        if not modules:
            raise RecipeError(f"{where}.targets", got=config.targets or "the default (BatchNorm)",
                              expected="at least one affine BatchNorm1d/2d",
                              fix="use l1 or group_lasso for models without BatchNorm")
    else:
        modules = prunable(model, config.targets, config.ignore, where)
    batches = calibration_data(ctx, config.method, train=True)
    # weights already zero (an earlier pruning stage) stay zero while fine-tuning
    weighted = [(n, m) for n, m in select(model, None, [], default=DEFAULT_TARGETS)
                if isinstance(getattr(m, "weight", None), torch.Tensor)]
    keeper = MaskKeeper(weighted, [m.weight.detach() != 0 for _, m in weighted])
    result = fine_tune(model, batches, config.finetune, loss_fn=finetune_loss(ctx, batches),
                       callbacks=[Penalty(config.method, config.penalty, modules), keeper],
                       companions=finetune_companions(ctx))
    extra = {"penalty": config.penalty, "steps": result.steps,
             "losses": [round(x, 5) for x in result.losses]}
    if config.method == "l1":
        masks = masks_from_scores(magnitude_scores(modules), config.sparsity, config.scope)
        layers = apply_masks(modules, masks)
        MaskKeeper(modules, masks).apply()
        ctx.report["l1"] = summary(layers, scope=config.scope, **extra)
        return model
    pairs = bn_pairs(model)
    if config.method == "group_lasso":
        scores = [m.weight.detach().reshape(m.weight.shape[0], -1).norm(dim=1) for _, m in modules]
        keep = channel_keep(scores, config.sparsity, config.scope)
        for (name, m), k in zip(modules, keep, strict=True):
            zero_channels(m, pairs.get(name, (None, None))[1], k)
    else:
        scores = [m.weight.detach().abs() for _, m in modules]
        keep = channel_keep(scores, config.sparsity, config.scope)
        owner = {bn_name: layer for layer, (bn_name, _) in pairs.items()}
        mods = dict(model.named_modules())
        for (name, bn), k in zip(modules, keep, strict=True):
            zero_channels(mods.get(owner.get(name, ""), None), bn, k)
    channels = {name: {"channels": int(k.numel()), "zeroed": int((~k).sum())}
                for (name, _), k in zip(modules, keep, strict=True)}
    n = sum(v["channels"] for v in channels.values())
    z = sum(v["zeroed"] for v in channels.values())
    ctx.report[config.method] = {
        **extra, "scope": config.scope, "channels": channels,
        "channel_sparsity": z / n if n else 0.0,
        "removed": "no: channels are zeroed in place (weights, bias, BatchNorm γ/β), not physically "
                   "removed; run prune: {method: structured} to shrink the layers",
    }
    return model


_DOC = ("Fine-tune with the penalty, then zero weights (l1) or whole channels, in place.\n\n"
        "Args:\n    model: modified and returned.\n    config: a RegularizePruneConfig.\n"
        "    ctx: trains on ``ctx.advanced['train']`` or ``ctx.data``.\n\n"
        "Returns:\n    ``model``.\n\nRaises:\n    DataError: no training data.\n"
        "    RecipeError: bad targets (e.g. bn_gamma on a model without BatchNorm).")


@register("prune", "l1", RegularizePruneConfig,
          summary="L1 penalty during fine-tuning, then unstructured magnitude pruning")
def prune_l1(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    return _handler(model, config, ctx)


@register("prune", "group_lasso", RegularizePruneConfig,
          summary="group-lasso penalty on output channels, then zero the weakest channels")
def prune_group_lasso(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    return _handler(model, config, ctx)


@register("prune", "bn_gamma", RegularizePruneConfig,
          summary="network slimming: L1 on BatchNorm γ, then zero the channels with small |γ|")
def prune_bn_gamma(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    return _handler(model, config, ctx)


for _fn in (prune_l1, prune_group_lasso, prune_bn_gamma):
    _fn.__doc__ = _DOC

__all__ = ["RegularizePruneConfig", "bn_pairs", "channel_keep", "prune_bn_gamma",
           "prune_group_lasso", "prune_l1", "zero_channels"]
