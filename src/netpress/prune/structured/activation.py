"""Data-aware channel importance and per-group budgets of structured pruning.

* :func:`input_energy` — ``E[x_c²]`` of every Conv / Linear input channel on calibration batches;
* :func:`activation_scores` (``importance: activation``) — the output energy a channel feeds into
  its consumers: ``Σ_consumers Σ_o (s_o·W[o, c])² · E[x_c²]`` with ``s_o`` the scale of the
  BatchNorm that follows the consumer (``gamma / sqrt(var + eps)``, 1 when none). It is the
  channel-level form of Wanda's ``|w|·‖x‖``: a channel that is large in the weights but silent on
  real data scores low, and the other way round;
* :func:`group_sensitivity` / :func:`allocate` (``budget: sensitivity``) — each group's loss
  (KL of the pruned model's logits to the original's) when only that group loses a fraction of its
  least important channels, then per-group fractions chosen greedily by the smallest loss per MAC
  saved until the MAC budget is met. Removing a channel is simulated by zeroing it at the input of
  every consumer (exact for the non-depthwise consumers that carry it; the model is not edited).

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.core.data import Batch
    >>> from netpress.prune.structured.graph import ChannelGraph
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(2, 1, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([[[[1.0]]], [[[3.0]]]]))
    ...     _ = net[1].weight.copy_(torch.tensor([[[[2.0]], [[1.0]]]]))
    >>> batch = Batch((torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]),))  # mean 0.5, variance 0.25
    >>> g = next(ChannelGraph(net, batch, set()).groups())
    >>> activation_scores(g, input_moments(net, [batch]), bn_scales(net)).tolist()  # 2²·1²·¼, 1²·3²·¼
    [1.0, 2.25]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.core.data import Batch
from netpress.measure.metrics import first_tensor
from netpress.prune.structured.graph import ChannelGroup

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _depthwise(layer: nn.Module) -> bool:
    groups = getattr(layer, "groups", 1)
    return groups > 1 and groups == getattr(layer, "in_channels", -1)


def input_moments(model: nn.Module, batches: Sequence[Batch], max_batches: int = 4
                  ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{id(layer): (E[x_c], Var[x_c])}`` of every Conv / Linear input channel, over the first
    ``max_batches`` batches (eval mode, no gradient)."""
    sums: dict[int, list[Any]] = {}

    def hook(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().double()
        x = x.transpose(0, 1).flatten(1) if not isinstance(layer, nn.Linear) else \
            x.reshape(-1, x.shape[-1]).t()  # (C, N)
        acc = sums.setdefault(id(layer), [0.0, 0.0, 0])
        acc[0] = acc[0] + x.sum(1)
        acc[1] = acc[1] + x.pow(2).sum(1)
        acc[2] += x.shape[1]

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, _LAYERS)]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in list(batches)[:max_batches]:
                b.run(model)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    out = {}
    for k, (s1, s2, n) in sums.items():
        mean = s1 / n
        out[k] = (mean.float(), (s2 / n - mean.pow(2)).clamp_min(0).float())
    return out


def following_bn(model: nn.Module) -> dict[int, nn.Module]:
    """``{id(layer): BatchNorm}`` for each Conv / Linear followed by its BatchNorm in a
    ``nn.Sequential`` (torchvision's Conv-BN-act blocks)."""
    out: dict[int, nn.Module] = {}
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.children())
        for a, b in zip(kids, kids[1:], strict=False):
            if isinstance(a, _LAYERS) and isinstance(b, nn.modules.batchnorm._BatchNorm) \
                    and b.running_var is not None and b.num_features == getattr(
                        a, "out_channels", getattr(a, "out_features", -1)):
                out[id(a)] = b
    return out


def bn_scales(model: nn.Module) -> dict[int, torch.Tensor]:
    """``{id(layer): gamma / sqrt(var + eps)}`` of the BatchNorm following each layer."""
    out = {}
    for key, b in following_bn(model).items():
        s = (b.running_var + b.eps).rsqrt()  # type: ignore[operator]
        out[key] = (s * b.weight if b.weight is not None else s).detach().float()
    return out


def compensate_means(group: ChannelGroup, gone: Sequence[int],
                     moments: dict[int, tuple[torch.Tensor, torch.Tensor]],
                     norms: dict[int, nn.Module]) -> None:
    """Before ``gone`` (root indices) are removed: move their mean contribution ``W[:, c]·E[x_c]``
    into each consumer's bias, or into the running mean of the BatchNorm that follows it, so the
    consumers' outputs keep their mean (exact for 1x1 / Linear consumers, borders aside)."""
    gone_set = set(int(i) for i in gone)
    for layer, side, idxs, root_idxs in group.items:
        if side != "in" or _depthwise(layer) or getattr(layer, "groups", 1) > 1 \
                or id(layer) not in moments:
            continue
        cols = [i for i, r in zip(idxs, root_idxs, strict=True) if r in gone_set]
        if not cols:
            continue
        idx = torch.as_tensor(cols, dtype=torch.long)
        mean = moments[id(layer)][0][idx]  # (k,)
        with torch.no_grad():
            w = layer.weight.detach()[:, idx].float()  # (O, k, *kernel)
            delta = (w.flatten(2).sum(2) if w.dim() > 2 else w) @ mean  # (O,)
            bn = norms.get(id(layer))
            if layer.bias is not None:
                layer.bias.add_(delta.to(layer.bias.dtype))
            elif bn is not None and bn.running_mean is not None:
                bn.running_mean.sub_(delta.to(bn.running_mean.dtype))


def activation_scores(group: ChannelGroup,
                      moments: dict[int, tuple[torch.Tensor, torch.Tensor]],
                      scales: dict[int, torch.Tensor]) -> torch.Tensor:
    """Output variance each channel of ``group`` feeds its consumers (root index space)."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for layer, side, idxs, root_idxs in group.items:
        if side != "in" or getattr(layer, "groups", 1) > 1 or id(layer) not in moments:
            continue  # depthwise / grouped consumers: no column per channel
        w = layer.weight.detach().float()  # (O, I, *k) or (O, I)
        if id(layer) in scales:
            w = w * scales[id(layer)].view(-1, *([1] * (w.dim() - 1)))
        col = w.pow(2).transpose(0, 1).flatten(1).sum(1)  # (I,)
        idx = torch.as_tensor(idxs, dtype=torch.long)
        s = (col[idx] * moments[id(layer)][1][idx]).double()
        total.scatter_add_(0, torch.as_tensor(root_idxs, dtype=torch.long), s)
    return total.float()


def _kl(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.dim() == 2 and out.shape[1] > 1:
        return float(F.kl_div(F.log_softmax(out.float(), 1), F.log_softmax(ref.float(), 1),
                              log_target=True, reduction="batchmean"))
    return float((out.float() - ref.float()).pow(2).mean() / ref.float().pow(2).mean().clamp_min(
        1e-12))


def group_sensitivity(model: nn.Module, groups: Sequence[ChannelGroup],
                      orders: Sequence[torch.Tensor], batch: Batch,
                      removed: Callable[[ChannelGroup, float], int], grid: Sequence[float],
                      moments: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
                      ) -> list[list[float]]:
    """Loss (KL to the unpruned logits on ``batch``) when one group alone loses a fraction.

    Args:
        model: the unpruned model (not edited: removal is simulated by input masks).
        groups, orders: channel groups and their channels, least important first.
        batch: the examples to measure on.
        removed: ``(group, fraction) -> channels removed`` (rounding included).
        grid: the fractions to measure; equal removal counts are measured once.
        moments: input means per layer (:func:`input_moments`): a removed channel is replaced
            by its mean (what :func:`compensate_means` does to the pruned model), else by zero.

    Returns:
        ``loss[i][j]`` for group ``i`` at ``grid[j]``.
    """
    was = model.training
    model.eval()
    with torch.no_grad():
        ref = first_tensor(batch.run(model))
    out: list[list[float]] = []
    try:
        for g, order in zip(groups, orders, strict=True):
            seen: dict[int, float] = {}
            row = []
            for f in grid:
                n = removed(g, f)
                if n not in seen:
                    seen[n] = 0.0 if n == 0 else _masked_loss(model, g, order[:n], batch, ref,
                                                              moments or {})
                row.append(seen[n])
            out.append(row)
    finally:
        model.train(was)
    return out


def _masked_loss(model: nn.Module, g: ChannelGroup, gone: torch.Tensor, batch: Batch,
                 ref: torch.Tensor, moments: dict[int, tuple[torch.Tensor, torch.Tensor]]
                 ) -> float:
    gone_set = set(gone.tolist())
    handles = []
    for layer, side, idxs, root_idxs in g.items:
        if side != "in":
            continue
        cols = [i for i, r in zip(idxs, root_idxs, strict=True) if r in gone_set]
        if not cols:
            continue
        mask_idx = torch.as_tensor(cols, dtype=torch.long)
        linear = isinstance(layer, nn.Linear)
        fill = moments[id(layer)][0][mask_idx] if id(layer) in moments and not _depthwise(
            layer) else torch.zeros(len(cols))

        def pre(_m: nn.Module, args: tuple[torch.Tensor, ...], idx: torch.Tensor = mask_idx,
                lin: bool = linear, v: torch.Tensor = fill) -> tuple[torch.Tensor, ...]:
            x = args[0].clone()
            if lin:
                x[..., idx] = v.to(x.dtype)
            else:
                x[:, idx] = v.to(x.dtype).view(-1, *([1] * (x.dim() - 2)))
            return (x, *args[1:])

        handles.append(layer.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            return _kl(first_tensor(batch.run(model)), ref)
    finally:
        for h in handles:
            h.remove()


def allocate(grid: Sequence[float], loss: Sequence[Sequence[float]],
             macs_of: Callable[[list[float]], int], target: int) -> list[float] | None:
    """Per-group fractions from ``grid``: greedy by smallest loss increase per MAC saved.

    Each step moves one group to a further grid point (any further one, so a flat stretch after a
    bump is found) with the smallest ``Δloss / ΔMACs``, until ``macs_of(fractions) <= target``.

    Returns:
        The fractions, or ``None`` when even the last grid point everywhere misses ``target``.

    Example:
        >>> # group 0 is cheap to prune, group 1 costly; each fraction saves 100 MACs per 0.5
        >>> macs = lambda f: int(400 - 200 * f[0] - 200 * f[1])
        >>> allocate([0.0, 0.5, 1.0], [[0, 0.1, 0.2], [0, 5.0, 9.0]], macs, 200)
        [1.0, 0.0]
    """
    cur = [0] * len(loss)
    frac = [grid[0]] * len(loss)
    macs = macs_of(frac)
    while macs > target:
        best: tuple[float, int, int, int] | None = None
        for i, row in enumerate(loss):
            for j in range(cur[i] + 1, len(grid)):
                trial = list(frac)
                trial[i] = grid[j]
                m = macs_of(trial)
                saved = macs - m
                if saved <= 0:
                    continue
                cost = max(row[j] - row[cur[i]], 0.0) + 1e-9 * (j - cur[i])
                key = cost / saved
                if best is None or key < best[0]:
                    best = (key, i, j, m)
        if best is None:
            return None
        _, i, j, macs = best
        cur[i], frac[i] = j, grid[j]
    improved = True
    while improved:  # back off the steps the last big jumps made unnecessary
        improved = False
        for i in sorted(range(len(loss)), key=lambda k: -loss[k][cur[k]]):
            if cur[i] == 0:
                continue
            trial = list(frac)
            trial[i] = grid[cur[i] - 1]
            m = macs_of(trial)
            if m <= target and loss[i][cur[i] - 1] < loss[i][cur[i]]:
                cur[i], frac, macs, improved = cur[i] - 1, trial, m, True
    return frac


__all__ = ["activation_scores", "allocate", "bn_scales", "compensate_means", "following_bn",
           "group_sensitivity", "input_moments"]
