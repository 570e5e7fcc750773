"""Mixed precision from measured sensitivity (SPEC Q9): ``quantize: {method: mixed, ...}``.

Recipe::

    quantize: {method: mixed, bits: [2, 4, 8], size_ratio: 8, finetune: {epochs: 3}}
    # or size_budget_bytes: 20000 (packed weight codes + scales of the targeted layers)

1. Sensitivity: every targeted layer, alone, gets its weights rounded to each candidate bit
   width (per-channel symmetric, round to nearest) and the metric is measured on the
   *calibration* batches (``ctx.data``; never the evaluation split): accuracy when the batches have
   labels, else top-1 agreement with the float model. The drop (points) and the loss increase
   (cross-entropy, or KL to the float model) are recorded per layer and width.
2. Choice (greedy, like a knapsack by ratio): start with every layer at the widest candidate; while
   the weight bytes exceed the budget, lower by one step the layer whose step costs the least
   sensitivity per byte saved (sensitivity = drop + 0.01 · loss increase, so ties on a small
   calibration set are broken by the loss).
3. Optional QAT fine-tuning (weights only, STE) at the chosen widths, then conversion to packed
   layers (``bits`` per weight, float32 scales). Activations stay float.

``ctx.report["mixed"]`` lists the chosen bits per layer, the sensitivity table and the bytes.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.api import quantize
    >>> X = torch.randn(64, 8); y = (X[:, 0] > 0).long()
    >>> m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    >>> q = quantize(m, {"method": "mixed", "size_ratio": 4, "finetune": {"epochs": 0}},
    ...              data=(X, y))
    >>> {q[0].bits, q[2].bits} <= {2, 4, 8}
    True
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.data import Batch
from netpress.core.errors import DataError, RecipeError
from netpress.quantize.fakequant import WeightFakeQuant
from netpress.quantize.pack import packed_numel
from netpress.quantize.qat import (
    convert,
    prepare,
    select_layers,
    size_summary,
    train,
    train_batches,
)
from netpress.train.loop import TrainConfig


class MixedConfig(TechniqueConfig):
    """Config of ``mixed``.

    Attributes:
        bits: candidate weight widths (each 2..8).
        size_budget_bytes: budget for the packed weight codes + scales of the targeted layers.
        size_ratio: alternatively, fp32 weight bytes of the targeted layers / budget.
        max_batches: calibration batches used per sensitivity measurement.
        finetune: QAT fine-tuning at the chosen widths (``epochs: 0`` skips it).
        targets, ignore: module patterns (default: every Linear, Conv1d and Conv2d).
    """

    method: Literal["mixed"] = "mixed"
    bits: list[int] = Field(default_factory=lambda: [2, 4, 8], min_length=1)
    size_budget_bytes: int | None = Field(default=None, gt=0)
    size_ratio: float | None = Field(default=None, gt=1)
    max_batches: int = Field(default=8, ge=1)
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=3, lr=1e-3))
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> MixedConfig:
        bad = [b for b in self.bits if isinstance(b, bool) or not 2 <= b <= 8]
        if bad:
            raise ValueError(f"bits {bad} out of range: every candidate must be in 2..8 "
                             "(use e.g. bits: [2, 4, 8])")
        if (self.size_budget_bytes is None) == (self.size_ratio is None):
            raise ValueError("give exactly one of size_budget_bytes or size_ratio "
                             "(e.g. size_ratio: 8)")
        return self


def layer_bytes(module: nn.Module, bits: int) -> int:
    """Packed bytes of ``module``'s weight at ``bits`` plus one float32 scale per output channel."""
    w = module.weight
    return packed_numel(w.numel(), bits) + w.shape[0] * 4


def score_classifier(model: nn.Module, batches: list[Batch],
                     ref: list[torch.Tensor]) -> tuple[float, float]:
    """(metric in points, loss) on ``batches``; labels when present, else the float outputs."""
    correct, total, loss = 0, 0, 0.0
    with torch.no_grad():
        for b, r in zip(batches, ref, strict=True):
            out = b.run(model).float()  # (B, classes)
            target = b.target if b.target is not None else r.argmax(-1)
            correct += int((out.argmax(-1) == target).sum())
            total += int(target.numel())
            if b.target is not None:
                loss += float(F.cross_entropy(out, target, reduction="sum"))
            else:
                loss += float(F.kl_div(F.log_softmax(out, -1), F.log_softmax(r, -1),
                                       log_target=True, reduction="sum"))
    return 100.0 * correct / max(total, 1), loss / max(total, 1)


def sensitivity(model: nn.Module, layers: list[tuple[str, nn.Module]], bits: list[int],
                batches: list[Batch]) -> dict[str, dict[int, dict[str, float]]]:
    """Per layer and width: metric drop (points) and loss increase, that layer quantized alone.

    Raises:
        DataError: no calibration batches.
    """
    if not batches:
        raise DataError("calibration data", got="no batches",
                        expected="calibration batches to measure per-layer sensitivity",
                        fix="pass calibration data (the evaluation split is never used)")
    was = model.training
    model.eval()
    with torch.no_grad():
        ref = [b.run(model) for b in batches]
    base_metric, base_loss = score_classifier(model, batches, ref)
    table: dict[str, dict[int, dict[str, float]]] = {}
    for name, module in layers:
        original = module.weight.detach().clone()
        table[name] = {}
        for b in bits:
            wq = WeightFakeQuant("int", b, original.shape[0])
            with torch.no_grad():
                module.weight.copy_(wq(original))
            metric, loss = score_classifier(model, batches, ref)
            table[name][b] = {"drop": round(base_metric - metric, 4),
                              "loss_increase": round(loss - base_loss, 6)}
            with torch.no_grad():
                module.weight.copy_(original)
    model.train(was)
    return table


def choose_bits(layers: list[tuple[str, nn.Module]], bits: list[int],
                table: dict[str, dict[int, dict[str, float]]], budget: int) -> dict[str, int]:
    """Greedy choice of widths under ``budget`` bytes (see the module doc).

    Raises:
        RecipeError: the budget is below the all-narrowest size.
    """
    widths = sorted(set(bits))
    modules = dict(layers)
    choice = {name: widths[-1] for name, _ in layers}

    def cost(name: str, b: int) -> float:
        entry = table[name][b]
        return entry["drop"] + 0.01 * entry["loss_increase"]

    def total() -> int:
        return sum(layer_bytes(modules[n], b) for n, b in choice.items())

    while total() > budget:
        best, best_ratio = None, float("inf")
        for name, b in choice.items():
            i = widths.index(b)
            if i == 0:
                continue
            lower = widths[i - 1]
            saved = layer_bytes(modules[name], b) - layer_bytes(modules[name], lower)
            ratio = max(cost(name, lower) - cost(name, b), 0.0) / max(saved, 1)
            if ratio < best_ratio:
                best, best_ratio = (name, lower), ratio
        if best is None:
            smallest = sum(layer_bytes(modules[n], widths[0]) for n in choice)
            raise RecipeError("quantize.size_budget_bytes", got=budget,
                              expected=f">= {smallest} bytes (every layer at {widths[0]} bits)",
                              fix="raise the budget / lower size_ratio, add a narrower width to "
                                  "`bits`, or quantize more layers")
        choice[best[0]] = best[1]
    return choice


@register("quantize", "mixed", MixedConfig,
          summary="mixed-precision weights: per-layer bits from measured sensitivity under a "
                  "size budget")
def quantize_mixed(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Choose per-layer widths under the budget, fine-tune (optional), pack (in place).

    Args:
        model: the model (modified and returned).
        config: a :class:`MixedConfig`.
        ctx: ``ctx.data`` (calibration) measures sensitivity; ``ctx.advanced["train"]`` (else
            ``ctx.data``) fine-tunes; ``ctx.report["mixed"]`` gets the chosen bits per layer.

    Returns:
        The model with packed layers.

    Raises:
        RecipeError: nothing to quantize, or an unreachable budget. DataError: no calibration data.

    Example:
        >>> import torch, torch.nn as nn
        >>> ctx = StageContext(data=[Batch((torch.randn(16, 64),), torch.zeros(16).long())])
        >>> cfg = MixedConfig(size_ratio=10, finetune={"epochs": 0})
        >>> m = quantize_mixed(nn.Sequential(nn.Linear(64, 8)), cfg, ctx)
        >>> ctx.report["mixed"]["bits_per_layer"]
        {'0': 2}
    """
    assert isinstance(config, MixedConfig)
    layers, kept = select_layers(model, config.targets, config.ignore, "mixed")
    fp32 = sum(m.weight.numel() * 4 for _, m in layers)
    budget = config.size_budget_bytes or int(fp32 / float(config.size_ratio or 1))
    calib = list(ctx.data or [])[: config.max_batches]
    table = sensitivity(model, layers, sorted(set(config.bits)), calib)
    choice = choose_bits(layers, config.bits, table, budget)
    plan: dict[str, dict[str, Any]] = {n: {"mode": "int", "bits": b, "act": None}
                                       for n, b in choice.items()}
    wrappers = prepare(model, layers, plan)
    log = train(model, train_batches(ctx), config.finetune)
    converted = convert(model, wrappers)
    ctx.report["mixed"] = {"candidates": sorted(set(config.bits)), "budget_bytes": budget,
                           "bits_per_layer": choice, "sensitivity": {
                               n: {str(b): v for b, v in t.items()} for n, t in table.items()},
                           "sensitivity_data": f"calibration split, {len(calib)} batches",
                           "layers": converted, "kept_float": kept, "finetune": log,
                           **size_summary(converted)}
    return model.eval()


__all__ = ["MixedConfig", "choose_bits", "layer_bytes", "quantize_mixed", "sensitivity"]
