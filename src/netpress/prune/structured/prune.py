"""Structured pruning (SPEC P4): ``prune: {method: structured, macs_reduction: 2.0, ...}``.

Filters / channels / neurons / attention heads are physically removed, so the result is a smaller
*dense* model whose MACs and latency fall. Exactly one budget per config:
  * ``macs_reduction: R`` — search the removal fraction until ``count_macs`` (on one example of
    the data) is at most ``1/R`` of the original; a prediction from per-layer MACs picks the
    fraction, the real count checks it and the search steps on if it missed;
  * ``ratio: r`` — remove the fraction ``r`` of every channel group (heads / FFN neurons).

Every prunable group loses the same fraction (uniform widths keep the network balanced, which is
what runtimes reward); *which* channels go is decided by ``importance`` (see
:mod:`.importance`). Kept channel counts are multiples of ``round_to`` (default 16: on MobileNetV2
at 2.1x fewer MACs, ONNX Runtime fp32 batch 1 measured 1.63x faster with 16 and only 1.48x with 8;
groups of at most ``round_to`` channels are kept whole). CNNs go through
the dependency graph of :mod:`.graph` (BN, next layer, residual adds, concat, depthwise groups);
BERT-family encoders through :mod:`.transformer` (heads + FFN neurons).

Example:
    >>> import torch, torchvision
    >>> from netpress.api import prune
    >>> from netpress.core.data import Batch
    >>> from netpress.measure.macs import count_macs
    >>> model = torchvision.models.resnet18(num_classes=10).eval()
    >>> x = torch.randn(2, 3, 64, 64)
    >>> small = prune(model, {"method": "structured", "macs_reduction": 2.0}, data=[(x,)])
    >>> ex = Batch((x[:1],))
    >>> count_macs(model, ex) / count_macs(small, ex) >= 2.0, small(x).shape
    (True, torch.Size([2, 10]))
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.data import Batch
from netpress.core.errors import DataError, ModelError, RecipeError
from netpress.core.targeting import matches
from netpress.measure.macs import count_macs, macs_by_layer
from netpress.measure.metrics import first_tensor
from netpress.prune.structured.activation import (
    activation_scores,
    allocate,
    bn_scales,
    compensate_means,
    following_bn,
    group_sensitivity,
    input_moments,
)
from netpress.prune.structured.graph import ChannelGraph, ChannelGroup
from netpress.prune.structured.importance import accumulate_grads, channel_scores
from netpress.prune.structured.transformer import (
    find_blocks,
    head_scores,
    neuron_scores,
    prune_block,
)

MAX_TRIES = 6
#: fractions of a group measured by ``budget: sensitivity`` (and the allocation's choices)
SENS_GRID = (0.0, 0.25, 0.5, 0.75)


class StructuredPruneConfig(TechniqueConfig):
    """Config of ``structured`` pruning.

    Attributes:
        macs_reduction: target ``original MACs / pruned MACs`` (> 1), searched.
        ratio: fraction of every channel group removed, in [0, 1).
        importance: ``l1``, ``l2``, ``taylor`` (needs data), ``bn_gamma`` or ``activation``
            (output energy fed to the consumers on the data; see :mod:`.activation`).
        budget: ``uniform`` (every group loses the same fraction) or ``sensitivity`` (per-group
            fractions from each group's measured loss per MAC saved; see :mod:`.activation`).
        sensitivity_examples: examples of the first data batch that ``sensitivity`` measures on.
        round_to: kept channels are multiples of this (groups not larger than it are kept).
        max_ratio: at most this fraction of any group is removed.
        targets: layers whose output channels may be pruned (default: every Conv / Linear;
            for BERT: ``P.attention.self`` for heads, ``P.intermediate.dense`` for neurons).
        ignore: layers whose shapes must not change (their coupled channels are kept).
    """

    method: Literal["structured"] = "structured"
    macs_reduction: float | None = Field(default=None, gt=1.0, le=1000.0, allow_inf_nan=False)
    ratio: float | None = Field(default=None, ge=0.0, lt=1.0, allow_inf_nan=False)
    importance: Literal["l1", "l2", "taylor", "bn_gamma", "activation"] = "l1"
    budget: Literal["uniform", "sensitivity"] = "uniform"
    sensitivity_examples: int = Field(default=16, ge=1, le=100_000)
    round_to: int = Field(default=16, ge=1, le=4096)
    max_ratio: float = Field(default=0.9, gt=0.0, lt=1.0)
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_budget(self) -> StructuredPruneConfig:
        if (self.macs_reduction is None) == (self.ratio is None):
            raise ValueError("exactly one of `macs_reduction` (e.g. 2.0 = half the MACs) or "
                             "`ratio` (fraction of channels removed, e.g. 0.5)")
        return self


def kept(size: int, fraction: float, round_to: int, max_ratio: float) -> int:
    """Channels kept of a group of ``size`` when ``fraction`` is removed, rounded to ``round_to``.

    Example:
        >>> kept(96, 0.5, 8, 0.9), kept(96, 0.5, 16, 0.9), kept(8, 0.5, 8, 0.9), kept(100, 0.99, 8, 0.9)
        (48, 48, 8, 16)
    """
    if size <= round_to:
        return size
    floor = max(round_to, round_to * math.ceil(size * (1 - max_ratio) / round_to))
    want = round_to * round(size * (1 - fraction) / round_to)
    return int(min(size, max(floor, want)))


def _pattern_set(model: nn.Module, patterns: list[str], where: str) -> set[str]:
    """Names of the modules (and their descendants) and parameters the patterns match; a
    parameter's own name (``features.7.2.layer_scale``) keeps only the channels it scales."""
    hits = set()
    for i, p in enumerate(patterns):
        found = {n for n, m in model.named_modules() if n and matches(n, m, p, f"{where}[{i}]")}
        hits |= found
    params = {n for n, prm in model.named_parameters()
              if any(matches(n, prm, p, f"{where}[{i}]") for i, p in enumerate(patterns))}
    # descendants of a matched module are covered too
    names = [n for n, _ in model.named_modules() if n]
    return {n for n in names if n in hits or any(n.startswith(h + ".") for h in hits)} | params


def _example(ctx: StageContext) -> Batch:
    if not ctx.data:
        raise DataError("prune.structured", got="no data",
                        expected="at least one batch to trace the model and count MACs",
                        fix="pass data (a recipe `data:` or prune(model, cfg, data=...))")
    return ctx.data[0].slice(1)


# ------------------------------------------------------------------------------------ CNNs
def _predict(groups: list[ChannelGroup], orders: list[torch.Tensor], layer_macs: dict[str, int],
             modules: dict[str, nn.Module], fraction: float | list[float],
             cfg: StructuredPruneConfig, total: int) -> int:
    """MACs after removing ``fraction`` of every group, or ``fraction[i]`` of group ``i``
    (per-layer MACs scale with in/out kept)."""
    out_rm: dict[str, int] = {}
    in_rm: dict[str, int] = {}
    fractions = fraction if isinstance(fraction, list) else [fraction] * len(groups)
    for g, order, f in zip(groups, orders, fractions, strict=True):
        gone = set(order[: g.size - kept(g.size, f, cfg.round_to, cfg.max_ratio)].tolist())
        if not gone:
            continue
        for name, roots in g.out_layers.items():
            out_rm[name] = out_rm.get(name, 0) + sum(r in gone for r in roots)
        for name, roots in g.in_layers.items():
            in_rm[name] = in_rm.get(name, 0) + sum(r in gone for r in roots)
    saved = 0.0
    for name in set(out_rm) | set(in_rm):
        m = modules[name]
        n_out = getattr(m, "out_channels", getattr(m, "out_features", 1))
        n_in = getattr(m, "in_channels", getattr(m, "in_features", 1))
        f_out = 1 - out_rm.get(name, 0) / n_out
        depthwise = getattr(m, "groups", 1) > 1 and getattr(m, "groups", 1) == n_in
        f_in = 1.0 if depthwise else 1 - in_rm.get(name, 0) / n_in
        saved += layer_macs.get(name, 0) * (1 - f_out * f_in)
    return int(total - saved)


def _by_name(model: nn.Module, stats: dict[int, Any]) -> dict[str, Any]:
    return {n: stats[id(m)] for n, m in model.named_modules() if id(m) in stats}


def _by_id(model: nn.Module, stats: dict[str, Any]) -> dict[int, Any]:
    return {id(m): stats[n] for n, m in model.named_modules() if n in stats}


def _prune_cnn(model: nn.Module, cfg: StructuredPruneConfig, example: Batch, ctx: StageContext,
               fraction: float | None, target: int | None, layer_macs: dict[str, int]
               ) -> tuple[nn.Module, float | list[float]]:
    total = sum(layer_macs.values())
    ignore = _pattern_set(model, cfg.ignore, "prune.ignore")
    targets = None if cfg.targets is None else _pattern_set(model, cfg.targets, "prune.targets")
    grads = base = None
    if cfg.importance == "taylor":
        grads = base = accumulate_grads(model, ctx.data or [])
    aware = cfg.importance == "activation" or cfg.budget == "sensitivity"
    moments: dict[str, Any] = _by_name(model, input_moments(model, ctx.data or [])) if aware else {}
    scales = _by_name(model, bn_scales(model)) if aware else {}
    if cfg.budget == "sensitivity" and target is None:
        assert fraction is not None
        target = -1  # set below: the MACs of the uniform ``ratio``
    base_ids = [id(p) for p in model.parameters()]
    pristine = copy.deepcopy(model) if target is not None else None
    sens: list[list[float]] | None = None

    def removed(g: ChannelGroup, f: float) -> int:
        return g.size - kept(g.size, f, cfg.round_to, cfg.max_ratio)

    fractions: float | list[float] | None = fraction
    for attempt in range(MAX_TRIES):
        work = model if attempt == 0 else copy.deepcopy(pristine)
        graph = ChannelGraph(work, example, ignore)
        groups = list(graph.groups(None if targets is None else
                                   (lambda n, m: n in targets)))  # type: ignore[operator]
        if not groups:
            raise RecipeError("prune.structured", got="no prunable channel group",
                              expected="Conv / Linear layers whose outputs feed other layers",
                              fix="check `targets` / `ignore`")
        if base is not None and attempt > 0:  # gradients were keyed by the first copy's params
            grads = {id(p): base[b] for p, b in zip(work.parameters(), base_ids, strict=True)
                     if b in base}
        m_ids = _by_id(work, moments)
        if cfg.importance == "activation":
            scores = [activation_scores(g, m_ids, _by_id(work, scales)) for g in groups]
        else:
            scores = [channel_scores(g, cfg.importance, grads) for g in groups]
        orders = [torch.argsort(s, stable=True) for s in scores]
        modules = dict(work.named_modules())
        if target == -1:
            target = _predict(groups, orders, layer_macs, modules, fraction or 0.0, cfg, total)
        if target is not None and cfg.budget == "sensitivity":
            if sens is None:
                batch = (ctx.data or [example])[0].slice(cfg.sensitivity_examples)
                sens = group_sensitivity(work, groups, orders, batch, removed, SENS_GRID,
                                         m_ids)
            goal = int(target * (1 - 0.01 * attempt))
            alloc = allocate(
                SENS_GRID, sens,
                lambda f, gs=groups, os_=orders, md=modules: _predict(
                    gs, os_, layer_macs, md, f, cfg, total), goal)
            if alloc is None:
                raise RecipeError(
                    "prune.macs_reduction", got=cfg.macs_reduction,
                    expected=f"a reduction reachable with at most {max(SENS_GRID):.0%} of every "
                    "channel group removed (others are ignored or feed the output)",
                    fix="lower macs_reduction, use budget: uniform, or shrink `ignore`")
            fractions = alloc
        elif target is not None:
            lo, hi = 0.0, cfg.max_ratio
            if _predict(groups, orders, layer_macs, modules, hi, cfg, total) > target:
                raise RecipeError(
                    "prune.macs_reduction", got=cfg.macs_reduction,
                    expected=f"a reduction reachable with at most {cfg.max_ratio:.0%} of every "
                    "channel group removed (others are ignored or feed the output)",
                    fix="lower macs_reduction, raise max_ratio, or shrink `ignore`")
            for _ in range(30):
                mid = (lo + hi) / 2
                if _predict(groups, orders, layer_macs, modules, mid, cfg, total) <= target:
                    hi = mid
                else:
                    lo = mid
            fractions = min(cfg.max_ratio, hi + 0.005 * attempt)
        assert fractions is not None
        per = fractions if isinstance(fractions, list) else [fractions] * len(groups)
        norms = following_bn(work)
        for g, order, f in zip(groups, orders, per, strict=True):
            gone = order[:removed(g, f)].tolist()
            if aware:
                compensate_means(g, gone, m_ids, norms)
            g.remove(gone)
        if target is None or count_macs(work, example) <= target:
            return work, fractions
    assert fractions is not None
    return work, fractions


# ------------------------------------------------------------------------------------ BERT
def _prune_bert(model: nn.Module, cfg: StructuredPruneConfig, example: Batch, ctx: StageContext,
                fraction: float | None, target: int | None) -> tuple[nn.Module, float]:
    blocks = find_blocks(model)
    ignore = _pattern_set(model, cfg.ignore, "prune.ignore")
    targets = None if cfg.targets is None else _pattern_set(model, cfg.targets, "prune.targets")

    def allowed(*names: str) -> bool:
        return not any(n in ignore for n in names) and (
            targets is None or any(n in targets for n in names))

    grads = accumulate_grads(model, ctx.data or []) if cfg.importance == "taylor" else None
    if cfg.importance == "bn_gamma":
        raise RecipeError("prune.importance", got="bn_gamma", expected="l1, l2, taylor or "
                          "activation for a BERT encoder (it has no BatchNorm)",
                          fix="use importance: l1")
    if cfg.budget == "sensitivity":
        raise RecipeError("prune.budget", got="sensitivity", expected="uniform for a BERT "
                          "encoder (per-group budgets are for CNN channel groups)",
                          fix="use budget: uniform")
    moments = None
    if cfg.importance == "activation":
        moments = _by_name(model, input_moments(model, ctx.data or []))
    plan = []
    for b in blocks:
        heads = torch.argsort(head_scores(model, b, cfg.importance, grads, moments),
                              descending=True, stable=True) \
            if allowed(b.prefix, b.attention, b.attn_out) else None
        neurons = torch.argsort(neuron_scores(model, b, cfg.importance, grads, moments),
                                descending=True, stable=True) \
            if allowed(b.prefix, b.ffn_in, b.ffn_out) else None
        plan.append((b, heads, neurons))

    def apply(m: nn.Module, f: float) -> nn.Module:
        for b, heads, neurons in plan:
            kh = b.heads if heads is None else max(1, round(b.heads * (1 - f)))
            kn = b.neurons if neurons is None else kept(b.neurons, f, cfg.round_to, cfg.max_ratio)
            prune_block(m, b, list(range(b.heads)) if heads is None else heads[:kh].tolist(),
                        list(range(b.neurons)) if neurons is None else neurons[:kn].tolist(),
                        moments)
        return m

    if target is not None:
        lo, hi = 0.0, cfg.max_ratio
        if count_macs(apply(copy.deepcopy(model), hi), example) > target:
            raise RecipeError("prune.macs_reduction", got=cfg.macs_reduction,
                              expected=f"a reduction reachable by removing {cfg.max_ratio:.0%} "
                              "of heads and FFN neurons", fix="lower macs_reduction")
        for _ in range(10):
            mid = (lo + hi) / 2
            if count_macs(apply(copy.deepcopy(model), mid), example) <= target:
                hi = mid
            else:
                lo = mid
        fraction = hi
    assert fraction is not None
    return apply(model, fraction), fraction


@register("prune", "structured", StructuredPruneConfig,
          summary="structured: remove channels / heads / FFN neurons (dense, smaller) to a MAC "
          "budget or ratio")
def prune_structured(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Physically remove channels (CNNs) or heads + FFN neurons (BERT) from ``model``.

    Args:
        model: the model (edited in place when possible; use the returned module).
        config: a :class:`StructuredPruneConfig`.
        ctx: needs ``ctx.data`` (its first example traces the graph and counts MACs);
            ``ctx.report["structured"]`` gets MACs before/after, the fraction and the widths.

    Returns:
        The pruned dense model (eval mode).

    Raises:
        DataError: no data. RecipeError: unreachable budget, or a coupled layer that cannot be
            resized (the message names it and what to put in ``ignore``). ModelError: the model
            cannot be traced, or the pruned model fails on the example (with the reason).

    Example:
        >>> import torch, torch.nn as nn
        >>> from netpress.api import prune
        >>> net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),
        ...                     nn.Conv2d(32, 4, 1))
        >>> small = prune(net, {"method": "structured", "ratio": 0.5}, data=[(torch.randn(1, 3, 8, 8),)])
        >>> small[0].out_channels, small[1].num_features, small[3].in_channels
        (16, 16, 16)
    """
    assert isinstance(config, StructuredPruneConfig)
    example = _example(ctx)
    model.eval()
    with torch.no_grad():
        ref = first_tensor(example.run(model))
    bert = bool(find_blocks(model))
    layer_macs = {} if bert else macs_by_layer(model, example)
    total = count_macs(model, example) if bert else sum(layer_macs.values())
    target = None if config.macs_reduction is None else int(total / config.macs_reduction)
    if bert:
        model, fraction = _prune_bert(model, config, example, ctx, config.ratio, target)
    else:
        model, fraction = _prune_cnn(model, config, example, ctx, config.ratio, target, layer_macs)
    model.eval()
    try:
        with torch.no_grad():
            out = first_tensor(example.run(model))
    except Exception as exc:
        raise ModelError("prune.structured", got=f"the pruned model fails: {exc}"[:300],
                         expected="a pruned model that runs",
                         fix="add the layer the error names to `ignore`") from exc
    if out.shape != ref.shape:
        raise ModelError("prune.structured", got=f"output shape {tuple(out.shape)}",
                         expected=f"the original {tuple(ref.shape)}",
                         fix="add the output layers to `ignore`")
    after = count_macs(model, example)
    ctx.report["structured"] = {
        "macs_before": total, "macs_after": after, "macs_reduction": total / max(after, 1),
        "fraction": fraction, "importance": config.importance, "round_to": config.round_to,
        "widths": _widths(model),
    }
    return model


def _widths(model: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
        elif hasattr(m, "num_attention_heads") and hasattr(m, "attention_head_size"):
            out[name] = int(m.num_attention_heads)
    return out


__all__ = ["StructuredPruneConfig", "kept", "prune_structured"]
