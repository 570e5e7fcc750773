"""Gradient-based scores: ``gradient`` |dL/dw|, ``taylor`` |w·dL/dw| (SPEC P2) and ``obd`` (P3).

Scores are accumulated over the calibration batches:

* ``gradient``: ``s = Σ_b |g_b|`` with ``g_b = dL_b/dw`` the gradient of batch ``b``;
* ``taylor``: ``s = Σ_b |w · g_b|`` (first-order Taylor estimate of the loss change when ``w`` is
  removed, Molchanov et al. 2017/2019);
* ``obd``: ``s = ½ · h_ww · w²`` with the diagonal Hessian ``h_ww`` estimated by the empirical
  Fisher ``mean_i g_i²`` over micro-batches of ``fisher_batch`` examples (LeCun et al. 1990).

The loss is cross-entropy when the batches have targets; otherwise labels are sampled from the
original model's softmax (``loss: auto``; see :func:`netpress.prune.scores.calibration_loss`,
which also offers ``kl`` to the original). Masks follow ``sparsity`` (layer / global) or N:M.

Example:
    >>> import torch, torch.nn as nn, netpress
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> X, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    >>> pruned = netpress.prune(model, {"method": "taylor", "sparsity": 0.5}, data=(X, y))
    >>> int((pruned[0].weight == 0).sum()), int((pruned[2].weight == 0).sum())
    (64, 24)
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.prune.options import NMFields
from netpress.prune.scores import (
    apply_masks,
    calibration_data,
    calibration_loss,
    masks_from_scores,
    prunable,
    summary,
)


class GradientPruneConfig(NMFields, TechniqueConfig):
    """Config of ``gradient``, ``taylor`` and ``obd`` pruning.

    Attributes:
        method: ``gradient`` (|dL/dw|), ``taylor`` (|w·dL/dw|) or ``obd`` (½·h_ww·w²).
        sparsity: fraction removed in [0, 1), or ``"2:4"``/``"4:8"`` (also ``n``, ``m``).
        scope: ``layer`` or ``global`` ranking.
        loss: ``auto`` (CE with targets, else labels sampled from the original), ``cross_entropy``,
            ``kl`` (to the original) or ``fisher``.
        max_batches: use at most this many calibration batches.
        fisher_batch: micro-batch size of the empirical Fisher (``obd`` only; 1 = per example).
        targets / ignore: module patterns (default: Linear, Conv1d, Conv2d).
    """

    method: Literal["gradient", "taylor", "obd"] = "taylor"
    scope: Literal["layer", "global"] = "layer"
    loss: Literal["auto", "cross_entropy", "kl", "fisher"] = "auto"
    max_batches: int | None = Field(default=None, ge=1)
    fisher_batch: int = Field(default=8, ge=1, le=4096)
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_target(self) -> GradientPruneConfig:
        if (self.sparsity is None) == (self.n is None):
            raise ValueError("give exactly one of `sparsity` (e.g. 0.5) or an N:M pattern "
                             "(sparsity: '2:4')")
        return self


def gradient_scores(
    model: nn.Module,
    modules: list[tuple[str, nn.Module]],
    batches: list,
    kind: str,
    reference: nn.Module | None,
    loss_mode: str = "auto",
    fisher_batch: int = 8,
    seed: int = 0,
) -> list[tuple[str, torch.Tensor]]:
    """Accumulate ``gradient`` / ``taylor`` / ``obd`` scores over ``batches``.

    Args:
        model: the model (its gradients are cleared afterwards; weights unchanged).
        modules: the scored modules.
        batches: calibration batches.
        kind: ``gradient``, ``taylor`` or ``obd``.
        reference: the original model (loss reference for unlabelled batches), or None.
        loss_mode: see :func:`netpress.prune.scores.calibration_loss`.
        fisher_batch: micro-batch size for ``obd``.
        seed: seeds the sampled labels of ``fisher``.

    Returns:
        ``(name, score)`` pairs, scores shaped like the weights, ``>= 0``.
    """
    gen = torch.Generator().manual_seed(seed)
    weights = [m.weight for _, m in modules]
    acc = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    was_training = model.training
    model.eval()  # BN / dropout as at inference: score the deployed function
    count = 0
    try:
        for batch in batches:
            parts = [batch]
            if kind == "obd":
                parts = [_sub(batch, i, i + fisher_batch) for i in range(0, batch.size, fisher_batch)]
            for part in parts:
                loss = calibration_loss(model, part, reference, loss_mode, gen)
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for a, w, g in zip(acc, weights, grads, strict=True):
                    if g is None:
                        continue
                    g = g.detach().to(torch.float32)
                    if kind == "gradient":
                        a.add_(g.abs())
                    elif kind == "taylor":
                        a.add_((w.detach().to(torch.float32) * g).abs())
                    else:
                        a.add_(g.square())  # empirical Fisher ≈ diag(H), summed
                count += 1
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    if kind == "obd":
        acc = [0.5 * (a / max(count, 1)) * w.detach().to(torch.float32).square()
               for a, w in zip(acc, weights, strict=True)]  # ½ h_ww w²
    return [(name, a) for (name, _), a in zip(modules, acc, strict=True)]


def _sub(batch, start: int, stop: int):
    """Examples ``start:stop`` of a batch."""
    from netpress.core.data import Batch

    if isinstance(batch.inputs, dict):
        inputs = {k: v[start:stop] for k, v in batch.inputs.items()}
    else:
        inputs = tuple(v[start:stop] for v in batch.inputs)
    return Batch(inputs, None if batch.target is None else batch.target[start:stop])


def _handler(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    assert isinstance(config, GradientPruneConfig)
    modules = prunable(model, config.targets, config.ignore, f"prune.{config.method}")
    batches = calibration_data(ctx, config.method)
    if config.max_batches:
        batches = batches[: config.max_batches]
    if config.nm is not None:  # shape errors before any work
        from netpress.prune.nm import check_nm_shape

        for name, m in modules:
            check_nm_shape(tuple(m.weight.shape), config.nm[1], name)
    reference = ctx.original if ctx.original is not None and ctx.original is not model else None
    if reference is None and config.loss != "cross_entropy":  # a frozen copy of the unpruned model
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    scores = gradient_scores(model, modules, batches, config.method, reference, config.loss,
                             config.fisher_batch, ctx.seed)
    masks = masks_from_scores(scores, config.sparsity, config.scope, config.nm)
    layers = apply_masks(modules, masks)
    ctx.report[config.method] = summary(layers, scope=config.scope, batches=len(batches),
                                        nm=f"{config.n}:{config.m}" if config.nm else None)
    return model


_DOC = ("Zero the lowest-scoring weights of the targeted modules in place.\n\n"
        "Args:\n    model: modified and returned.\n    config: a GradientPruneConfig.\n"
        "    ctx: ``ctx.data`` calibration batches; ``ctx.original`` the loss reference.\n\n"
        "Returns:\n    ``model`` with exact zeros.\n\nRaises:\n    DataError: no calibration data."
        "\n    RecipeError: bad targets or an N:M shape mismatch (names the layer).")


@register("prune", "gradient", GradientPruneConfig,
          summary="gradient sensitivity |dL/dw| accumulated over calibration batches")
def prune_gradient(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    return _handler(model, config, ctx)


@register("prune", "taylor", GradientPruneConfig,
          summary="first-order Taylor |w·dL/dw| accumulated over calibration batches")
def prune_taylor(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    return _handler(model, config, ctx)


@register("prune", "obd", GradientPruneConfig,
          summary="Optimal Brain Damage ½·h_ww·w² (diagonal Hessian from the empirical Fisher)")
def prune_obd(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    return _handler(model, config, ctx)


for _fn in (prune_gradient, prune_taylor, prune_obd):
    _fn.__doc__ = _DOC

__all__ = ["GradientPruneConfig", "gradient_scores", "prune_gradient", "prune_obd", "prune_taylor"]
