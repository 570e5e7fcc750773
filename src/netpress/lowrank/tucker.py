"""Tucker-2 decomposition of convolutions (SPEC L2): ``lowrank: {method: tucker, ratio: 0.5}``.

A conv kernel ``W (O, I, k...)`` is decomposed along its two channel modes,
``W ≈ G ×₀ U_out ×₁ U_in`` with ``U_out (O, r_o)``, ``U_in (I, r_i)`` and the core
``G (r_o, r_i, k...)``, which is the sequence

    1x1 conv I -> r_i (weight U_inᵀ)  →  k×k conv r_i -> r_o (weight G, the original stride /
    padding / dilation)  →  1x1 conv r_o -> O (weight U_out, the original bias)

as ``nn.Sequential`` of plain ``Conv1d`` / ``Conv2d`` (reloads from the artifact). The factors come
from HOSVD (leading left singular vectors of the mode-0 and mode-1 unfoldings) refined by
``als_iters`` rounds of HOOI (alternating least squares). Ranks per layer from exactly one of
``ratio`` (``r = ceil(ratio·channels)`` per mode), ``energy`` (per mode, the smallest rank keeping
that fraction of the unfolding's squared singular values) or ``rank: [r_out, r_in]`` (larger than
the channels → :class:`RecipeError` naming the layer). Grouped convs, 1x1 convs and layers where the
decomposition would not lower the MACs are left alone (listed in the report).

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.api import apply
    >>> _ = torch.manual_seed(0)
    >>> m = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1))
    >>> out = apply("lowrank", m, {"method": "tucker", "ratio": 0.5})
    >>> [tuple(c.weight.shape) for c in out[0]]
    [(8, 16, 1, 1), (16, 8, 3, 3), (32, 16, 1, 1)]
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.errors import RecipeError
from netpress.core.targeting import select
from netpress.lowrank.common import energy_rank, recover, set_module
from netpress.train.loop import TrainConfig

_CONVS = (nn.Conv1d, nn.Conv2d)


class TuckerConfig(TechniqueConfig):
    """Config of ``lowrank: {method: tucker}``.

    Attributes:
        ratio: rank fraction of each channel mode, in (0, 1).
        energy: per-mode energy threshold, in (0, 1].
        rank: fixed ``[r_out, r_in]`` for every targeted conv.
        als_iters: HOOI refinement rounds after HOSVD (0: plain HOSVD).
        targets, ignore: module patterns (default targets: Conv1d and Conv2d).
        finetune: optional :class:`TrainConfig` run after decomposition.
    """

    method: Literal["tucker"] = "tucker"
    ratio: float | None = Field(default=None, gt=0, lt=1)
    energy: float | None = Field(default=None, gt=0, le=1)
    rank: tuple[int, int] | None = None
    als_iters: int = Field(default=5, ge=0, le=100)
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)
    finetune: TrainConfig | None = None

    @model_validator(mode="after")
    def _one_mode(self) -> TuckerConfig:
        if sum(v is not None for v in (self.energy, self.ratio, self.rank)) != 1:
            raise ValueError("give exactly one of energy, ratio or rank")
        return self


def _unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: ``(w.shape[mode], rest)``."""
    return w.movedim(mode, 0).reshape(w.shape[mode], -1)


def _leading(m: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` leading left singular vectors of ``m`` as columns ``(rows, r)``."""
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, :r]


def tucker2(w: torch.Tensor, r_out: int, r_in: int,
            als_iters: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of ``w (O, I, k...)``: ``(core (r_o, r_i, k...), U_out (O, r_o), U_in (I, r_i))``."""
    w = w.double()
    u_out = _leading(_unfold(w, 0), r_out)  # (O, r_o)
    u_in = _leading(_unfold(w, 1), r_in)  # (I, r_i)
    for _ in range(als_iters):  # HOOI: each factor from W projected on the other
        y = torch.einsum("oi...,ir->or...", w, u_in)  # (O, r_i, k...)
        u_out = _leading(_unfold(y, 0), r_out)
        y = torch.einsum("oi...,or->ri...", w, u_out)  # (r_o, I, k...)
        u_in = _leading(_unfold(y, 1), r_in)
    core = torch.einsum("oi...,or,is->rs...", w, u_out, u_in)  # (r_o, r_i, k...)
    return core, u_out, u_in


def tucker_ranks(conv: nn.Conv1d | nn.Conv2d, config: TuckerConfig, name: str) -> tuple[int, int]:
    """``(r_out, r_in)`` for one conv (see the module doc).

    Raises:
        RecipeError: a fixed rank larger than the layer's channels.
    """
    o, i = conv.out_channels, conv.in_channels
    if config.rank is not None:
        r_o, r_i = config.rank
        if r_o > o or r_i > i or min(r_o, r_i) < 1:
            raise RecipeError(f"lowrank.rank for layer {name!r}", got=[r_o, r_i],
                              expected=f"1 <= [r_out, r_in] <= [{o}, {i}] (its channels)",
                              fix=f"lower the rank, use ratio/energy, or add {name!r} to ignore")
        return r_o, r_i
    w = conv.weight.detach().double()
    if config.energy is not None:
        return (min(o, energy_rank(torch.linalg.svdvals(_unfold(w, 0)), config.energy)),
                min(i, energy_rank(torch.linalg.svdvals(_unfold(w, 1)), config.energy)))
    assert config.ratio is not None
    return max(1, math.ceil(config.ratio * o)), max(1, math.ceil(config.ratio * i))


def decompose_conv(conv: nn.Conv1d | nn.Conv2d, r_out: int, r_in: int,
                   als_iters: int = 5) -> nn.Sequential:
    """The 1x1 → k×k → 1x1 ``Sequential`` replacing ``conv`` (see the module doc)."""
    cls = type(conv)
    core, u_out, u_in = tucker2(conv.weight.detach(), r_out, r_in, als_iters)
    ones = (1,) * (conv.weight.dim() - 2)
    first = cls(conv.in_channels, r_in, 1, bias=False)
    mid = cls(r_in, r_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
              bias=False, padding_mode=conv.padding_mode)
    last = cls(r_out, conv.out_channels, 1, bias=conv.bias is not None)
    with torch.no_grad():
        first.weight.copy_(u_in.T.reshape(r_in, conv.in_channels, *ones).float())
        mid.weight.copy_(core.float())
        last.weight.copy_(u_out.reshape(conv.out_channels, r_out, *ones).float())
        if conv.bias is not None:
            last.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, mid, last)


@register("lowrank", "tucker", TuckerConfig,
          summary="Tucker-2 of conv kernels (1x1 -> kxk -> 1x1, HOSVD + HOOI); ranks from ratio/energy")
def lowrank_tucker(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Registered handler: decompose every targeted conv (see the module doc)."""
    assert isinstance(config, TuckerConfig)
    chosen = [(n, m) for n, m in select(model, config.targets, config.ignore, default=_CONVS,
                                        where="lowrank.targets") if isinstance(m, _CONVS)]
    ranks, kept = {}, []
    for name, conv in chosen:
        k = math.prod(conv.kernel_size)
        if conv.groups != 1 or k == 1:
            kept.append(name)
            continue
        r_o, r_i = tucker_ranks(conv, config, name)
        o, i = conv.out_channels, conv.in_channels
        if i * r_i + r_i * r_o * k + r_o * o >= o * i * k:  # MACs per output position
            kept.append(name)
            continue
        set_module(model, name, decompose_conv(conv, r_o, r_i, config.als_iters))
        ranks[name] = [r_o, r_i]
    ctx.report.update(ranks=ranks, left_dense=kept)
    ctx.report.update(recover(model, ctx, config.finetune, "lowrank"))
    return model


__all__ = ["TuckerConfig", "decompose_conv", "lowrank_tucker", "tucker2", "tucker_ranks"]
