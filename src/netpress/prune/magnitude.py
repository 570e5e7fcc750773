"""Unstructured magnitude pruning (SPEC P1): ``prune: {method: magnitude, ...}``.

Two modes, exactly one per config:
  * percentage (``sparsity: p``): remove the ``floor(p·n)`` weights of smallest ``|w|``, so
    ``n - floor(p·n)`` (= ``(1-p)·n`` when that is whole) stay non-zero (fewer only when more than
    that many weights were zero already);
  * threshold (``threshold: tau``): zero every weight with ``|w| < tau``.

``scope: layer`` ranks each layer's weights on their own (every layer gets sparsity ``p``);
``scope: global`` ranks all targeted weights together (layers get different sparsities, the total
is ``p``). Ties at the cut are broken deterministically: earlier layers (definition order) and,
within a layer, lower flat indices are pruned first.

Weights are zeroed in place and stay dense fp32 tensors (no mask buffers, no reparametrisation);
the artifact stores them sparsely (bitmask + values), so bytes on disk fall with sparsity.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.api import prune
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3))
    >>> pruned = prune(model, {"method": "magnitude", "sparsity": 0.7, "scope": "global"})
    >>> int((pruned[0].weight != 0).sum() + (pruned[2].weight != 0).sum())  # 130 - floor(0.7*130)
    39
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.errors import RecipeError
from netpress.core.targeting import select
from netpress.prune.options import GradualFields, NMFields
from netpress.quantize.qscheme import check_finite

DEFAULT_TARGETS = (nn.Linear, nn.Conv1d, nn.Conv2d)


class MagnitudePruneConfig(NMFields, GradualFields, TechniqueConfig):
    """Config of ``magnitude`` pruning.

    Attributes:
        sparsity: fraction of weights removed, in [0, 1) (percentage mode).
        threshold: zero every weight with ``|w| < threshold`` (threshold mode, ``>= 0``).
        scope: ``layer`` (each layer gets ``sparsity``) or ``global`` (ranked together).
        targets: module patterns whose ``weight`` is pruned (default: Linear, Conv1d, Conv2d).
        ignore: module patterns left untouched.
        n, m: N:M semi-structured mode (SPEC P5), also spelled ``sparsity: "2:4"``.
        schedule: ``cubic`` prunes gradually while fine-tuning (SPEC P6, see
            :mod:`netpress.prune.schedule`, with ``initial_sparsity``, ``prune_steps``,
            ``prune_end``, ``finetune``).
    """

    method: Literal["magnitude"] = "magnitude"
    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0, allow_inf_nan=False)
    threshold: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    scope: Literal["layer", "global"] = "layer"
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_mode(self) -> MagnitudePruneConfig:
        modes = (self.sparsity is not None) + (self.threshold is not None) + (self.n is not None)
        if modes != 1:
            raise ValueError("exactly one of `sparsity` (a fraction in [0, 1), or 'N:M' such as "
                             "'2:4') or `threshold` (|w| below it is zeroed); e.g. sparsity: 0.5")
        return self


def prune_count(n: int, sparsity: float) -> int:
    """How many of ``n`` weights percentage mode removes: ``floor(p·n)``, robust to float error.

    Example:
        >>> prune_count(10, 0.3), prune_count(9, 0.5), prune_count(7, 0.0)
        (3, 4, 0)
    """
    return min(n, int(math.floor(sparsity * n + 1e-9 * max(1, n))))


def keep_masks(
    weights: list[torch.Tensor], n_prune: int
) -> list[torch.Tensor]:
    """Boolean keep-masks removing exactly ``n_prune`` of the smallest ``|w|`` across ``weights``.

    Ties at the cut go first to earlier tensors, then to lower flat indices (deterministic).
    Uses ``kthvalue`` plus one comparison, not a full sort, so memory stays ~2 bytes/weight extra.

    Args:
        weights: the tensors ranked together (one for layer scope, all targets for global).
        n_prune: how many to remove (``0 <= n_prune <= total``).

    Returns:
        One bool tensor per weight, True where the weight stays.

    Example:
        >>> import torch
        >>> [m.tolist() for m in keep_masks([torch.tensor([1.0, -1.0, 3.0, 0.5])], 2)]
        [[False, True, True, False]]
    """
    flat = torch.cat([w.detach().reshape(-1).abs().to(torch.float32) for w in weights])  # (N,)
    if n_prune <= 0:
        prune = torch.zeros_like(flat, dtype=torch.bool)
    elif n_prune >= flat.numel():
        prune = torch.ones_like(flat, dtype=torch.bool)
    else:
        cut = torch.kthvalue(flat, n_prune).values  # the n_prune-th smallest |w|
        prune = flat < cut
        need = n_prune - int(prune.sum())  # >= 1: at least one |w| equals the cut
        ties = torch.nonzero(flat == cut).reshape(-1)[:need]  # lowest indices first
        prune[ties] = True
    masks, start = [], 0
    for w in weights:
        masks.append(~prune[start : start + w.numel()].reshape(w.shape))
        start += w.numel()
    return masks


def _targets(model: nn.Module, config: MagnitudePruneConfig) -> list[tuple[str, torch.Tensor]]:
    chosen = select(model, config.targets, config.ignore, default=DEFAULT_TARGETS,
                    where="prune.targets")
    out = []
    for name, module in chosen:
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            check_finite(w, f"{name}.weight")
            out.append((name, w))
    if not out:
        raise RecipeError(
            "prune.targets", got=config.targets or "the default (Linear, Conv1d, Conv2d)",
            expected="at least one module with a floating-point `weight`",
            fix="check `targets` / `ignore` (`netpress inspect` lists module names)",
        )
    return out


@register("prune", "magnitude", MagnitudePruneConfig,
          summary="unstructured magnitude pruning: sparsity p (layer/global) or threshold |w| < tau")
def prune_magnitude(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Zero the smallest-magnitude weights of the targeted modules, in place.

    Args:
        model: the model to prune (modified and returned).
        config: a :class:`MagnitudePruneConfig`.
        ctx: the stage context; ``ctx.report["magnitude"]`` gets per-layer zero counts.

    Returns:
        ``model``, whose targeted weights hold exact zeros.

    Raises:
        RecipeError: the targets select no weight. ModelError: a weight holds NaN/Inf.

    Example:
        >>> import torch, torch.nn as nn
        >>> from netpress.core.config import StageContext
        >>> lin = nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[0.1, -2.0, 0.3, 4.0], [-0.05, 1.0, 0.2, 0.0]]))
        >>> cfg = MagnitudePruneConfig(threshold=0.25)
        >>> prune_magnitude(nn.Sequential(lin), cfg, StageContext())[0].weight.tolist()
        [[0.0, -2.0, 0.30000001192092896, 4.0], [0.0, 1.0, 0.0, 0.0]]
    """
    assert isinstance(config, MagnitudePruneConfig)
    if config.schedule is not None:  # SPEC P6: gradual, with fine-tuning
        from netpress.prune.schedule import run_gradual

        return run_gradual(model, config, ctx)
    targets = _targets(model, config)
    weights = [w for _, w in targets]
    if config.nm is not None:  # SPEC P5: keep the n largest |w| of every m
        from netpress.prune.nm import nm_mask

        masks = [nm_mask(w.detach().abs(), config.nm[0], config.nm[1], name) for name, w in targets]
    elif config.threshold is not None:
        tau = float(config.threshold)
        masks = [w.detach().abs() >= tau for w in weights]
    elif config.scope == "global":
        total = sum(w.numel() for w in weights)
        masks = keep_masks(weights, prune_count(total, float(config.sparsity or 0.0)))
    else:
        masks = [keep_masks([w], prune_count(w.numel(), float(config.sparsity or 0.0)))[0]
                 for w in weights]
    layers: dict[str, Any] = {}
    with torch.no_grad():
        for (name, w), keep in zip(targets, masks, strict=True):
            w.masked_fill_(~keep.to(w.device), 0.0)  # +0.0, never -0.0
            layers[name] = {"numel": w.numel(), "zeros": int((w == 0).sum())}
    n = sum(v["numel"] for v in layers.values())
    zeros = sum(v["zeros"] for v in layers.values())
    emptied = [name for name, v in layers.items() if v["zeros"] == v["numel"]]
    if emptied:  # a layer with no weight left cuts the network at that point
        warnings.warn(f"prune magnitude: every weight of {len(emptied)} layer(s) is now zero "
                      f"({', '.join(emptied[:4])}); the model's output no longer depends on "
                      "what feeds them. Use scope: layer, a lower sparsity / threshold, or put "
                      "them in `ignore`.", stacklevel=2)
    ctx.report["magnitude"] = {
        "emptied_layers": emptied,
        "mode": "threshold" if config.threshold is not None else "n:m" if config.nm else "sparsity",
        "scope": config.scope, "layers": layers, "sparsity": zeros / n if n else 0.0,
    }
    return model


__all__ = ["MagnitudePruneConfig", "keep_masks", "prune_count", "prune_magnitude"]
