"""Outlier-weighted layer-wise sparsity (OWL, Yin et al. 2024) for one-shot Wanda / SparseGPT.

Instead of the same sparsity in every block, blocks with more *outliers* keep more weights. A
block is the set of targeted layers sharing a name prefix up to their last numeric component
(``bert.encoder.layer.3.attention.self.query`` -> ``bert.encoder.layer.3``); a model without
numbered blocks has one block and gets the uniform sparsity. For block ``l`` the outlier ratio
``D_l`` is the fraction of Wanda scores ``|w_ij|·‖x_j‖`` larger than ``M`` times their layer's mean
score. The block sparsities are ``s_l = s - (D'_l - mean_k D'_k)`` with ``D'`` the ratios rescaled to
``[0, 2λ]``; the mean over blocks, weighted by their weight counts, is exactly ``s`` again
(blocks of equal size, as in BERT: a plain mean), and every ``s_l`` is inside ``[s-λ, s+λ]``.

Example:
    >>> import torch
    >>> ratios = {"enc.0": 0.01, "enc.1": 0.03}
    >>> s = owl_sparsities(ratios, {"enc.0": 100, "enc.1": 100}, 0.5, lam=0.08)
    >>> round(s["enc.0"], 3), round(s["enc.1"], 3)
    (0.58, 0.42)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from pydantic import BaseModel, Field

from netpress.core.data import Batch


class OWLFields(BaseModel):
    """Non-uniform layer-wise sparsity for ``wanda`` / ``sparsegpt`` (off unless ``owl_lambda``).

    Attributes:
        owl_lambda: ``λ``, how far a block's sparsity may move from the target (0 = uniform).
        owl_m: ``M``, a score is an outlier above ``M`` times its layer's mean score.
    """

    owl_lambda: float = Field(default=0.0, ge=0.0, lt=0.5, allow_inf_nan=False)
    owl_m: float = Field(default=5.0, gt=1.0, le=1000.0, allow_inf_nan=False)


def block_of(name: str) -> str:
    """The block prefix of a layer name: up to its last numeric component (``""`` if none).

    Example:
        >>> block_of("bert.encoder.layer.3.output.dense"), block_of("fc")
        ('bert.encoder.layer.3', '')
    """
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return ""


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of the scores above ``m`` times the mean of their own layer.

    Example:
        >>> outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 9.0])], 2.0)
        0.25
    """
    hits = sum(int((s > m * s.mean()).sum()) for s in scores)
    return hits / max(1, sum(s.numel() for s in scores))


def owl_sparsities(
    ratios: dict[str, float], sizes: dict[str, int], sparsity: float, lam: float
) -> dict[str, float]:
    """Per-block sparsity from per-block outlier ratios (see the module doc).

    Args:
        ratios: outlier ratio ``D_l`` of every block.
        sizes: weight count of every block (the weighted mean stays ``sparsity``).
        sparsity: the overall target ``s``.
        lam: the half-width ``λ`` of the allowed range around ``s``.

    Returns:
        ``{block: s_l}``, clipped to ``[0, 0.99]``.
    """
    keys = list(ratios)
    d = torch.tensor([ratios[k] for k in keys], dtype=torch.float64)
    n = torch.tensor([sizes[k] for k in keys], dtype=torch.float64)
    span = float(d.max() - d.min())
    if len(keys) < 2 or span <= 0 or lam <= 0:
        return dict.fromkeys(keys, sparsity)
    scaled = (d - d.min()) / span * 2 * lam  # [0, 2λ]
    shift = scaled - (scaled * n).sum() / n.sum()  # weighted mean 0
    s = (sparsity - shift).clamp(0.0, 0.99)
    return {k: float(v) for k, v in zip(keys, s, strict=True)}


def _snap(per_block: dict[str, float], sizes: dict[str, int], sparsity: float,
          grid: int) -> dict[str, float]:
    """Round block sparsities to multiples of ``1/grid`` (row counts then floor exactly) and, for
    blocks of equal size, move single steps so that their sum stays ``len · sparsity``."""
    if grid > 1 << 16 or len(set(sizes.values())) != 1 or abs(sparsity * grid - round(
            sparsity * grid)) > 1e-9:
        return per_block
    keys = list(per_block)
    k = {b: round(per_block[b] * grid) for b in keys}
    gap = round(sparsity * grid) * len(keys) - sum(k.values())
    order = sorted(keys, key=lambda b: (per_block[b] * grid - k[b]) * (1 if gap > 0 else -1),
                   reverse=True)
    for b in order[: abs(gap)]:
        k[b] += 1 if gap > 0 else -1
    return {b: min(k[b], grid - 1) / grid for b in keys}


def type_sparsities(spars: dict[str, float], modules: Sequence[tuple[str, nn.Module]],
                    per_type: dict[str, float], where: str) -> dict[str, float]:
    """``spars`` with each layer matching a pattern of ``per_type`` set to that fraction (patterns
    as ``targets``: a module name, a class name or ``re:REGEX``; the first match wins).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> type_sparsities({"a.q": 0.5, "a.v": 0.5}, [("a.q", lin), ("a.v", lin)],
        ...                 {"re:.*\\.q": 0.7}, "demo")
        {'a.q': 0.7, 'a.v': 0.5}
    """
    from netpress.core.targeting import matches

    out = dict(spars)
    by_name = dict(modules)
    for name in out:
        hit = next((f for pat, f in per_type.items()
                    if matches(name, by_name[name], pat, where)), None)
        out[name] = out[name] if hit is None else hit
    return out


def layer_sparsities(
    model: nn.Module, modules: Sequence[tuple[str, nn.Module]], batches: Sequence[Batch],
    sparsity: float, lam: float, m: float,
) -> dict[str, float]:
    """The OWL sparsity of every targeted layer, from one calibration pass on ``model`` as is.

    Every layer gets its block's sparsity (see the module doc); ``lam == 0`` gives ``sparsity``
    everywhere without running the model.
    """
    if lam <= 0:
        return {name: sparsity for name, _ in modules}
    from netpress.prune.wanda import input_norms

    norms = input_norms(model, list(modules), list(batches))
    blocks: dict[str, list[torch.Tensor]] = {}
    sizes: dict[str, int] = {}
    for name, module in modules:
        if name not in norms:  # never reached: the method itself reports it
            continue
        w = module.weight.detach().to(torch.float32).reshape(module.weight.shape[0], -1)
        score = w.abs() * norms[name].reshape(1, -1)  # (out, in·k)
        b = block_of(name)
        blocks.setdefault(b, []).append(score)
        sizes[b] = sizes.get(b, 0) + w.numel()
    per_block = owl_sparsities({b: outlier_ratio(s, m) for b, s in blocks.items()}, sizes,
                               sparsity, lam)
    cols = [int(mod.weight[0].numel()) for _, mod in modules]
    per_block = _snap(per_block, sizes, sparsity, math.gcd(*cols))
    return {name: per_block.get(block_of(name), sparsity) for name, _ in modules}


__all__ = ["OWLFields", "block_of", "layer_sparsities", "outlier_ratio", "owl_sparsities",
           "type_sparsities"]
