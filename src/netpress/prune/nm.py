"""N:M semi-structured masks (SPEC P5): keep N of every M consecutive input weights.

Groups run along the input dimension of ``weight.flatten(1)`` (for a Linear, along ``in_features``;
for a conv, along ``in_channels · kernel``), which is the layout sparse tensor cores use for 2:4.
Any score works: ``|w|`` (magnitude), Wanda's ``|w|·‖x‖`` or SparseGPT's OBS error.

Recipe spelling: ``sparsity: "2:4"`` / ``"4:8"`` or ``n: 2, m: 4`` on ``magnitude``, ``wanda``,
``sparsegpt``, ``gradient``, ``taylor`` and ``obd``.

Example:
    >>> import torch
    >>> nm_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.2, 0.3]]), 2, 4, "fc").int().tolist()
    [[1, 0, 1, 0, 0, 1, 0, 1]]
"""

from __future__ import annotations

import torch

from netpress.core.errors import RecipeError


def check_nm_shape(shape: tuple[int, ...], m: int, name: str) -> int:
    """The input size ``prod(shape[1:])`` after checking it is a multiple of ``m``.

    Raises:
        RecipeError: naming the layer, its input size, and the ``ignore`` fix.
    """
    cols = 1
    for d in shape[1:]:
        cols *= int(d)
    if len(shape) < 2 or cols % m:
        raise RecipeError(
            name, got=f"weight {tuple(shape)} with input size {cols}",
            expected=f"an input size divisible by M={m} for N:M sparsity",
            fix=f"add {name!r} to `ignore` (e.g. ignore: [{name!r}]) or use another M",
        )
    return cols


def nm_mask(score: torch.Tensor, n: int, m: int, name: str) -> torch.Tensor:
    """Keep-mask with exactly ``n`` True in every group of ``m`` consecutive input weights.

    Args:
        score: non-negative importance shaped like the weight ``(out, in, *k)``.
        n: weights kept per group; m: group size.
        name: the layer (for errors).

    Returns:
        Bool tensor shaped like ``score``; ties keep the lower index.

    Raises:
        RecipeError: the input size is not a multiple of ``m``.
    """
    cols = check_nm_shape(tuple(score.shape), m, name)
    groups = score.detach().reshape(score.shape[0], cols // m, m).to(torch.float32)  # (out, G, M)
    # stable: sort descending by score; ties broken by lower index (argsort of -score is stable)
    order = torch.argsort(-groups, dim=-1, stable=True)[..., :n]  # (out, G, n)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order, True)
    return keep.reshape(score.shape)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive input weights has at most ``n`` non-zeros.

    Example:
        >>> is_nm(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 2, 4)
        True
    """
    cols = weight[0].numel() if weight.dim() > 1 else weight.numel()
    if cols % m:
        return False
    nz = (weight.reshape(weight.shape[0], cols // m, m) != 0).sum(-1)  # (out, G)
    return bool((nz <= n).all())


__all__ = ["check_nm_shape", "is_nm", "nm_mask"]
