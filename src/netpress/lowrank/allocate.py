"""Global rank allocation for ``lowrank: {method: svd, ratio: R, allocation: energy}``.

Instead of every layer keeping ``R`` of its weights, the layers share one budget
``R·Σ_l I_l·O_l``: each rank unit of layer ``l`` costs ``I_l + O_l`` weights and buys the fraction
``σ_i² / Σ_j σ_j²`` of that layer's (whitened, when activation-aware) energy; units are taken in
order of bought fraction per weight until the budget is spent (within a layer, largest first).
Layers whose singular values decay fast get less rank, flat ones more.

Example:
    >>> import torch
    >>> from netpress.lowrank.allocate import allocate_ranks
    >>> fast = torch.tensor([10.0, 1.0] + [0.1] * 6); flat = torch.ones(8)
    >>> allocate_ranks({"a": fast, "b": flat}, {"a": (8, 8), "b": (8, 8)}, 0.5)  # 4 units of 16
    {'a': 1, 'b': 3}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from netpress.core.data import Batch
from netpress.lowrank.whiten import _capture, _flat


def allocate_ranks(sigmas: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]],
                   ratio: float) -> dict[str, int]:
    """Ranks (at least 1 each) with ``Σ r_l·(I_l+O_l) <= ratio·Σ I_l·O_l`` (see the module doc).

    Args:
        sigmas: per layer, singular values sorted descending.
        shapes: per layer, ``(O, I)``.
        ratio: the fraction of the layers' weights to keep, in (0, 1).
    """
    budget = ratio * sum(o * i for o, i in shapes.values())
    ranks = {n: 1 for n in sigmas}
    spent = sum(o + i for o, i in shapes.values())
    units = []
    for n, s in sigmas.items():
        e = s.double().pow(2)
        frac = (e / e.sum().clamp(min=1e-300)).tolist()
        cost = sum(shapes[n])
        units += [(f / cost, k, n) for k, f in enumerate(frac) if k > 0]
    closed: set[str] = set()
    for _, k, n in sorted(units, key=lambda u: (-u[0], u[1])):
        cost = sum(shapes[n])
        if n in closed or k != ranks[n]:
            continue
        if spent + cost > budget:
            closed.add(n)  # keep every layer's units contiguous
            continue
        ranks[n], spent = k + 1, spent + cost
    return ranks


@torch.no_grad()
def input_moments(model: nn.Module, names: Sequence[str],
                  batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
    """``XXᵀ`` (float64, padding tokens dropped) of every named Linear's input, in one pass."""
    slot: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    mods = [model.get_submodule(n) for n in names]
    ctxs = [_capture(m, slot, n) for m, n in zip(mods, names, strict=True)]
    for c in ctxs:
        c.__enter__()
    try:
        for b in batches:
            slot.clear()
            b.run(model)
            for n in names:
                if n in slot:
                    x = _flat(slot[n], b.mask).float()  # (N, I); float32 product per batch
                    xx = (x.T @ x).double()
                    moments[n] = xx if n not in moments else moments[n] + xx
    finally:
        for c in ctxs:
            c.__exit__(None, None, None)
    return moments


__all__ = ["allocate_ranks", "input_moments"]
