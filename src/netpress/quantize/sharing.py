"""Weight sharing + entropy coding (Deep Compression, Han et al. 2016): ``quantize: {method:
weight_sharing, bits: 5}``.

Every targeted Linear / Conv1d / Conv2d becomes a :class:`netpress.nn.shared.SharedLinear` /
``SharedConv``: a per-layer k-means codebook of ``2^bits`` fp16 centroids (index 0 is the exact
zero when the layer was pruned, so sparsity survives) and one index per weight, the index stream
entropy-coded (zlib / bz2 / LZMA, whichever is smallest) in the artifact and decoded at load. After
pruning, the stream of mostly-zero indices compresses far below ``bits`` per weight.

BatchNorm layers that directly follow a conv inside an ``nn.Sequential`` are folded into it first
(``fold_bn``), so the artifact holds no separate BN tensors.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.api import quantize
    >>> _ = torch.manual_seed(0)
    >>> m = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> q = quantize(m, {"method": "weight_sharing", "bits": 4})
    >>> type(q[0]).__name__, len(q[0].weight.unique()) <= 16
    ('SharedLinear', True)
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import Field

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.targeting import select
from netpress.nn.shared import SharedConv, SharedLinear
from netpress.quantize.fold import fold_batchnorm  # re-exported: the one folding routine

_TARGETS = (nn.Linear, nn.Conv1d, nn.Conv2d)


class WeightSharingConfig(TechniqueConfig):
    """Config of ``quantize: {method: weight_sharing}``.

    Attributes:
        bits: codebook size ``2^bits`` for Linear layers (Han et al.: 5 for fully-connected).
        conv_bits: codebook bits for convs (default: ``bits``; Han et al. used 8).
        fold_bn: fold BatchNorm into the preceding conv first.
        targets, ignore: module patterns (default: Linear, Conv1d, Conv2d).
    """

    method: Literal["weight_sharing"] = "weight_sharing"
    bits: int = Field(default=5, ge=1, le=8)
    conv_bits: int | None = Field(default=None, ge=1, le=8)
    fold_bn: bool = True
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)


@register("quantize", "weight_sharing", WeightSharingConfig,
          summary="Deep Compression weight sharing: per-layer k-means codebook (2^bits), "
                  "entropy-coded indices (zlib/bz2/lzma), pruned zeros kept")
def quantize_weight_sharing(model: nn.Module, config: TechniqueConfig,
                            ctx: StageContext) -> nn.Module:
    """Registered handler (see the module doc)."""
    assert isinstance(config, WeightSharingConfig)
    model.eval()
    folded = fold_batchnorm(model) if config.fold_bn else []
    layers = {}
    for name, m in select(model, config.targets, config.ignore, default=_TARGETS,
                          where="quantize.targets"):
        if isinstance(m, nn.Linear):
            new: nn.Module = SharedLinear.from_float(m, config.bits)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding_mode == "zeros":
            new = SharedConv.from_float(m, config.conv_bits or config.bits)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        layers[name] = {"bytes": new.nbytes, "codec": new.codec}
    ctx.report.update(folded_bn=folded, layers=layers)
    return model


class EntropyCodeConfig(TechniqueConfig):
    """Config of ``quantize: {method: entropy_code}``: entropy-code the integer weight codes of
    layers an earlier QAT stage produced (``quantize: {method: qat, activations: null}``).

    Attributes:
        targets, ignore: module patterns (default: every ``PackedLinear`` / ``PackedConv1d/2d``).
    """

    method: Literal["entropy_code"] = "entropy_code"
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)


@register("quantize", "entropy_code", EntropyCodeConfig,
          summary="entropy-code (zlib/bz2/lzma) the integer codes of QAT layers (activations: null); "
                  "exact, pruned zeros cost ~nothing")
def quantize_entropy_code(model: nn.Module, config: TechniqueConfig,
                          ctx: StageContext) -> nn.Module:
    """Registered handler: every weight-only QAT ``Packed*`` layer becomes a ``Shared*`` layer with
    the same integer codes and per-channel scales, its code stream entropy-coded.

    Raises:
        RecipeError: a targeted layer quantizes its inputs (activation quantization would be lost).
    """
    assert isinstance(config, EntropyCodeConfig)
    from netpress.core.errors import RecipeError

    try:
        from netpress.nn.qat import PackedConv1d, PackedConv2d, PackedLinear
    except ImportError:  # pragma: no cover - QAT not installed in this checkout
        return model
    layers = {}
    for name, m in select(model, config.targets, config.ignore,
                          default=(PackedLinear, PackedConv1d, PackedConv2d),
                          where="quantize.targets"):
        if not isinstance(m, (PackedLinear, PackedConv1d, PackedConv2d)):
            continue
        if m.act_mode is not None or m.weight_mode != "int":
            raise RecipeError(f"quantize.entropy_code layer {name!r}",
                              got=f"act_mode={m.act_mode}, weight_mode={m.weight_mode}",
                              expected="weight-only integer QAT layers",
                              fix="use `quantize: {method: qat, activations: null}` before it")
        new = (SharedLinear.from_packed(m) if isinstance(m, PackedLinear)
               else SharedConv.from_packed(m))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        layers[name] = {"bytes": new.nbytes, "codec": new.codec}
    ctx.report.update(layers=layers)
    return model


__all__ = ["EntropyCodeConfig", "WeightSharingConfig", "fold_batchnorm", "quantize_entropy_code",
           "quantize_weight_sharing"]
