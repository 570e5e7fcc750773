"""Gradual pruning with the cubic schedule of Zhu & Gupta (2017) (SPEC P6).

``prune: {method: magnitude, sparsity: 0.9, schedule: cubic, finetune: {epochs: 10}}`` prunes
while fine-tuning with the shared loop :func:`netpress.train.fine_tune`: over the first
``prune_end`` fraction of the fine-tuning steps, ``prune_steps`` pruning events ``k = 0..n`` raise
the sparsity along

    s_k = s_f + (s_i - s_f) · (1 - k/n)³

(fast at first, while many redundant weights remain, slower near the target); the masks are the
smallest ``|w|`` of the current weights (layer or global scope), already-pruned weights stay
pruned. Between events the :class:`~netpress.prune.scores.MaskKeeper` callback zeroes the gradients
of pruned weights (``on_after_backward``) and re-applies the masks (``on_step_end``); the remaining
steps fine-tune with the final mask.

The loss is cross-entropy when the batches have targets, otherwise KL to the original model.

Example:
    >>> cubic_sparsity(0, 10, 0.0, 0.9), round(cubic_sparsity(5, 10, 0.0, 0.9), 4)
    (0.0, 0.7875)
    >>> cubic_sparsity(10, 10, 0.0, 0.9)
    0.9
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from netpress.core.config import StageContext
from netpress.core.data import Batch
from netpress.core.errors import RecipeError
from netpress.prune.scores import (
    MaskKeeper,
    apply_masks,
    calibration_data,
    calibration_loss,
    masks_from_scores,
    prunable,
    summary,
)
from netpress.train.loop import TrainConfig, fine_tune

ScoreFn = Callable[[Sequence[tuple[str, nn.Module]]], list[tuple[str, torch.Tensor]]]


def cubic_sparsity(k: int, n: int, initial: float, final: float) -> float:
    """Sparsity of pruning event ``k`` of ``n``: ``s_f + (s_i - s_f)(1 - k/n)³``."""
    if k >= n:
        return final
    return final + (initial - final) * (1.0 - k / n) ** 3


def event_steps(total_steps: int, prune_end: float, n: int) -> dict[int, int]:
    """Training step after which each pruning event ``k = 1..n`` happens: ``{step: k}``.

    Event 0 happens before the first step. Events that fall on the same step keep the last ``k``.

    Example:
        >>> event_steps(100, 0.5, 5)
        {10: 1, 20: 2, 30: 3, 40: 4, 50: 5}
    """
    end = max(1, int(round(total_steps * prune_end)))
    return {max(1, int(round(k * end / n))): k for k in range(1, n + 1)}


def magnitude_scores(modules: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, torch.Tensor]]:
    """``|w|`` of each module's weight."""
    return [(name, m.weight.detach().abs().to(torch.float32)) for name, m in modules]


class GradualPruner(MaskKeeper):
    """Fine-tuning callback that raises the sparsity along the cubic schedule.

    Args:
        modules: the pruned modules.
        final: target sparsity ``s_f``; initial: ``s_i``.
        events: ``{training step: event k}`` (see :func:`event_steps`); n: number of events.
        scope: ``layer`` or ``global``.
        score_fn: per-module scores (default ``|w|``).
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], final: float, initial: float,
                 events: dict[int, int], n: int, scope: str, score_fn: ScoreFn | None = None):
        self.final, self.initial, self.events, self.n, self.scope = final, initial, events, n, scope
        self.score_fn = score_fn or magnitude_scores
        self.history: list[tuple[int, float]] = []
        super().__init__(modules, [torch.ones_like(m.weight, dtype=torch.bool) for _, m in modules])
        self.prune(0, 0)

    def prune(self, k: int, step: int) -> None:
        s = cubic_sparsity(k, self.n, self.initial, self.final)
        self.set(masks_from_scores(self.score_fn(self.modules), s, self.scope))
        self.history.append((step, round(s, 6)))

    def on_step_end(self, step: int, model: nn.Module, loss: float) -> None:
        if step in self.events:
            self.prune(self.events[step], step)
        else:
            self.apply()


def finetune_loss(ctx: StageContext, batches: list[Batch]) -> Callable[[nn.Module, Batch], Any]:
    """Cross-entropy on labelled batches, otherwise KL to ``ctx.original``."""
    gen = torch.Generator().manual_seed(ctx.seed)
    original = ctx.original

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        mode = "cross_entropy" if batch.target is not None else "kl"
        return calibration_loss(model, batch, original, mode, gen)

    return loss


def finetune_companions(ctx: StageContext) -> list[nn.Module]:
    """The modules :func:`finetune_loss` may run besides the model (the original, for KL): passed
    as ``fine_tune(..., companions=...)`` so they follow the model to its device."""
    return [ctx.original] if ctx.original is not None else []


def run_gradual(model: nn.Module, config: Any, ctx: StageContext, method: str = "magnitude",
                score_fn: ScoreFn | None = None) -> nn.Module:
    """Prune ``model`` gradually along the cubic schedule while fine-tuning it, in place.

    Args:
        model: modified and returned.
        config: a config with ``sparsity``, ``scope``, ``targets``, ``ignore`` and the
            :class:`~netpress.prune.options.GradualFields` (``magnitude`` has them).
        ctx: fine-tunes on ``ctx.advanced["train"]`` when present (the recipe's train split),
            else on ``ctx.data``; ``ctx.report["schedule"]`` gets the (step, sparsity) events.
        method: the method name (for errors and the report).
        score_fn: per-module scores (default ``|w|``).

    Returns:
        ``model`` with the final sparsity, fine-tuned.

    Raises:
        RecipeError: no fraction sparsity (thresholds and N:M are one-shot only).
        DataError: no training batches.
    """
    if config.sparsity is None:
        raise RecipeError(f"prune.{method}.schedule", got="cubic with threshold or N:M",
                          expected="a fraction `sparsity` (e.g. 0.9)",
                          fix="use sparsity: 0.9 with schedule: cubic, or drop `schedule`")
    if config.initial_sparsity > config.sparsity:
        raise RecipeError(f"prune.{method}.initial_sparsity", got=config.initial_sparsity,
                          expected=f"at most sparsity ({config.sparsity})",
                          fix="lower initial_sparsity (usually 0)")
    modules = prunable(model, config.targets, config.ignore, f"prune.{method}")
    batches = calibration_data(ctx, method, train=True)
    ft: TrainConfig = config.finetune
    total = ft.epochs * len(batches)
    if ft.max_steps:
        total = min(total, ft.max_steps)
    events = event_steps(total, config.prune_end, config.prune_steps)
    pruner = GradualPruner(modules, float(config.sparsity), float(config.initial_sparsity),
                           events, config.prune_steps, config.scope, score_fn)
    result = fine_tune(model, batches, ft, loss_fn=finetune_loss(ctx, batches), callbacks=[pruner],
                       companions=finetune_companions(ctx))
    if not pruner.history or pruner.history[-1][1] != round(float(config.sparsity), 6):
        pruner.prune(config.prune_steps, result.steps)  # too few steps: reach the target anyway
    layers = apply_masks(modules, pruner.masks)
    ctx.report["schedule"] = summary(layers, schedule="cubic", scope=config.scope,
                                     events=pruner.history, steps=result.steps,
                                     losses=[round(x, 5) for x in result.losses])
    return model


__all__ = ["GradualPruner", "cubic_sparsity", "event_steps", "magnitude_scores", "run_gradual"]
