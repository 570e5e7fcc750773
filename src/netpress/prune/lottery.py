"""Lottery-ticket pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020) (SPEC P6).

``prune: {method: lottery, sparsity: 0.8, rounds: 3, rewind_steps: 50, finetune: {epochs: 10}}``:

  1. train the model for ``rewind_steps`` steps and keep those weights ``θ_k`` (the rewind point);
  2. train to the end (``finetune``) and prune, globally by ``|w|``, the fraction
     ``1 - (1 - s)^(1/rounds)`` of the weights still alive;
  3. rewind the surviving weights (and every other parameter / BN statistic) to ``θ_k``, keep the
     mask, and retrain with the mask fixed (:class:`~netpress.prune.scores.MaskKeeper`);
  4. repeat 2-3 ``rounds`` times; the last retrained network is the *ticket*.

All training goes through :func:`netpress.train.fine_tune`. The model's weights when the handler
is called are ``θ_0`` (for the classic experiment, pass a freshly initialised network). For the
control experiment, :func:`random_reinit` puts the same mask on a new random initialisation.

Example:
    >>> round(per_round_fraction(0.8, 3), 4)  # 41.5% of the survivors each round
    0.4152
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.prune.schedule import finetune_companions, finetune_loss, magnitude_scores
from netpress.prune.scores import (
    MaskKeeper,
    apply_masks,
    calibration_data,
    masks_from_scores,
    prunable,
    summary,
)
from netpress.train.loop import TrainConfig, fine_tune


class LotteryPruneConfig(TechniqueConfig):
    """Config of ``lottery`` (iterative magnitude pruning with rewinding).

    Attributes:
        sparsity: final fraction of targeted weights removed, in [0, 1).
        rounds: prune-rewind-retrain rounds.
        rewind_steps: training steps before the rewind checkpoint (0 = rewind to ``θ_0``).
        scope: ``global`` (the paper's choice for conv nets) or ``layer``.
        finetune: each (re)training run.
        targets / ignore: module patterns (default: Linear, Conv1d, Conv2d).
    """

    method: Literal["lottery"] = "lottery"
    sparsity: float = Field(ge=0.0, lt=1.0, allow_inf_nan=False)
    rounds: int = Field(default=3, ge=1, le=50)
    rewind_steps: int = Field(default=0, ge=0)
    scope: Literal["layer", "global"] = "global"
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=10, lr=1e-3))
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)


def per_round_fraction(sparsity: float, rounds: int) -> float:
    """Fraction of the surviving weights pruned each round so ``rounds`` rounds reach ``sparsity``."""
    return 1.0 - (1.0 - sparsity) ** (1.0 / rounds)


def ticket_masks(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """``{name: weight != 0}`` of a ticket's pruned modules (``ctx.report["lottery"]["layers"]``)."""
    mods = dict(model.named_modules())
    return {n: mods[n].weight.detach() != 0 for n in names}


def random_reinit(model: nn.Module, masks: dict[str, torch.Tensor], seed: int) -> nn.Module:
    """The control: same architecture and mask, fresh random weights (``reset_parameters``).

    Args:
        model: a ticket (copied; not modified).
        masks: ``{module name: keep-mask}`` (see :func:`ticket_masks`).
        seed: seeds the new initialisation.

    Returns:
        The re-initialised, masked copy.
    """
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
    mods = dict(fresh.named_modules())
    apply_masks([(n, mods[n]) for n in masks], list(masks.values()))
    return fresh


def train_masked(model: nn.Module, masks: dict[str, torch.Tensor], batches: list,
                 config: TrainConfig, ctx: StageContext) -> list[float]:
    """Train ``model`` with the mask held fixed (gradients masked, zeros re-applied)."""
    mods = dict(model.named_modules())
    keeper = MaskKeeper([(n, mods[n]) for n in masks], list(masks.values()))
    keeper.apply()
    return fine_tune(model, batches, config, loss_fn=finetune_loss(ctx, batches),
                     callbacks=[keeper], companions=finetune_companions(ctx)).losses


@register("prune", "lottery", LotteryPruneConfig,
          summary="lottery ticket: train, prune by |w|, rewind survivors to an early step, retrain")
def prune_lottery(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Find a winning ticket by iterative magnitude pruning with rewinding, in place.

    Args:
        model: ``θ_0`` (trained from its current weights); modified and returned.
        config: a :class:`LotteryPruneConfig`.
        ctx: trains on ``ctx.advanced["train"]`` when present, else ``ctx.data``;
            ``ctx.report["lottery"]`` gets per-round sparsity and losses, and ``masks``.

    Returns:
        The retrained ticket (exact zeros where pruned).

    Raises:
        DataError: no training data. RecipeError: bad targets.
    """
    assert isinstance(config, LotteryPruneConfig)
    modules = prunable(model, config.targets, config.ignore, "prune.lottery")
    batches = calibration_data(ctx, "lottery", train=True)
    names = [n for n, _ in modules]
    masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in modules}
    # 1. train to the rewind point θ_k (same run continues to the end below)
    rewind_state = copy.deepcopy(model.state_dict())
    if config.rewind_steps:
        early = config.finetune.model_copy(update={"max_steps": config.rewind_steps,
                                                   "cosine_decay": False})
        fine_tune(model, batches, early, loss_fn=finetune_loss(ctx, batches),
                  companions=finetune_companions(ctx))
        rewind_state = copy.deepcopy(model.state_dict())
    history = []
    frac = per_round_fraction(config.sparsity, config.rounds)
    train_masked(model, masks, batches, config.finetune, ctx)  # 2. dense training
    alive = sum(int(m.sum()) for m in masks.values())
    for r in range(config.rounds):
        # prune `frac` of the survivors by |w|: pruned weights have score 0, so they stay pruned
        total = sum(m.numel() for m in masks.values())
        target = 1.0 - (alive * (1.0 - frac)) / total if r < config.rounds - 1 else config.sparsity
        mods = dict(model.named_modules())
        new = masks_from_scores(magnitude_scores([(n, mods[n]) for n in names]), target,
                                config.scope)
        masks = {n: old & m for (n, old), m in zip(masks.items(), new, strict=True)}
        alive = sum(int(m.sum()) for m in masks.values())
        model.load_state_dict(rewind_state)  # 3. rewind everything to θ_k, keep the mask
        losses = train_masked(model, masks, batches, config.finetune, ctx)
        history.append({"round": r + 1, "sparsity": round(1 - alive / total, 6),
                        "final_loss": round(losses[-1], 5) if losses else None})
    mods = dict(model.named_modules())
    layers = apply_masks([(n, mods[n]) for n in names], [masks[n] for n in names])
    ctx.report["lottery"] = summary(layers, rounds=history, rewind_steps=config.rewind_steps)
    return model


__all__ = ["LotteryPruneConfig", "per_round_fraction", "prune_lottery", "random_reinit",
           "ticket_masks", "train_masked"]
