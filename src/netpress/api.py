"""One-technique Python API: ``netpress.prune(model, config, data)`` and friends.

The same config objects (or their dict form) as recipe stages; the same handlers run.

Example:
    >>> import torch, torch.nn as nn
    >>> import netpress
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> q = netpress.quantize(model, {"method": "int8_weight"})
    >>> type(q[0]).__name__
    'QuantLinear'
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch.nn as nn

from netpress.core.config import StageContext, TechniqueConfig, get_technique, parse_config
from netpress.core.data import as_batches
from netpress.core.errors import ModelError


def apply(
    stage: str,
    model: nn.Module,
    config: TechniqueConfig | dict[str, Any],
    data: Any = None,
    advanced: Any = None,
    *,
    inplace: bool = False,
    report: dict[str, Any] | None = None,
) -> nn.Module:
    """Apply one registered technique of ``stage`` to ``model``.

    Args:
        stage: ``prune``, ``quantize``, ``distill`` or ``lowrank``.
        model: the model; copied first unless ``inplace``.
        config: the technique's config object or its dict form (``{"method": ..., ...}``).
        data: calibration / fine-tuning data in any form :func:`netpress.core.data.as_batches`
            accepts (needed by data-driven methods only).
        advanced: technique-specific extras, passed through.
        inplace: modify ``model`` itself.
        report: a dict to fill with the stage's report (what a recipe run writes under
            ``stages`` in report.html: layers quantized, layers left in float, seconds, ...).

    Returns:
        The compressed model (eval mode).

    Raises:
        RecipeError: unknown method or invalid config. DataError: unusable data.
    """
    if not isinstance(model, nn.Module):
        raise ModelError("model", got=type(model).__name__, expected="a torch.nn.Module",
                         fix="pass the model object itself")
    cfg = parse_config(stage, config)
    tech = get_technique(stage, cfg.method)
    batches = None if data is None else as_batches(data, where="data")
    target = model if inplace else copy.deepcopy(model)
    ctx = StageContext(data=batches, original=model, advanced=advanced)
    out = tech.handler(target, cfg, ctx).eval()
    if report is not None:
        report.update(stage_report(stage, out, ctx))
    return out


def stage_report(stage: str, model: nn.Module, ctx: StageContext) -> dict[str, Any]:
    """The report of one stage: the handler's ``ctx.report`` and, after a quantization stage,
    ``float_layers``: every layer whose weight is still float (name -> type), whatever the reason.

    Example:
        >>> import torch.nn as nn
        >>> rep = {}
        >>> q = apply("quantize", nn.Sequential(nn.Linear(8, 8), nn.Conv1d(2, 2, 1)),
        ...           {"method": "int8_weight", "targets": ["0"]}, report=rep)
        >>> rep["float_layers"]
        {'1': 'Conv1d'}
    """
    from netpress.measure.count import float_weight_layers

    out = dict(ctx.report)
    if stage == "quantize":
        out["float_layers"] = float_weight_layers(model)
    return out


def prune(model: nn.Module, config: Any, data: Any = None, advanced: Any = None, *,
          report: dict[str, Any] | None = None) -> nn.Module:
    """Prune a copy of ``model`` (see :func:`apply`)."""
    return apply("prune", model, config, data, advanced, report=report)


def quantize(model: nn.Module, config: Any, data: Any = None, advanced: Any = None, *,
             report: dict[str, Any] | None = None) -> nn.Module:
    """Quantize a copy of ``model`` (see :func:`apply`; ``report`` lists the layers left float)."""
    return apply("quantize", model, config, data, advanced, report=report)


def load(path: str | Path) -> nn.Module:
    """Rebuild a compressed model from an artifact directory (verifies every SHA-256; no pickle).

    Raises:
        ArtifactError: missing or tampered files.
    """
    from netpress.export.artifact import load as _load

    return _load(path)


__all__ = ["apply", "prune", "quantize", "load", "stage_report"]
