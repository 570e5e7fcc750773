"""Training-free mask choices for Wanda (SPEC P3): the RIA score and a mask-only swap search.

Both keep Wanda's defining property: the kept weights of a pruned matrix keep their dense values
(no reconstruction solve); only *which* weights are zeroed changes.

* :func:`ria_score` (Zhang et al., ICLR 2024, "Plug-and-Play"): relative importance
  ``|w_ij|/Σ_k|w_ik| + |w_ij|/Σ_k|w_kj|`` times ``‖x_j‖₂^α`` (``α = 0.5`` in the paper).
* :func:`refine_mask`: a per-row swap search in the spirit of DSnoT (Zhang et al., ICLR 2024,
  "Dynamic Sparse No Training"): starting from a mask, repeatedly *grow* the pruned weight whose
  return lowers the row's reconstruction error ``dᵀ C d`` the most and *prune* the kept weight
  whose removal then raises it the least, accepting the pair only when the row's error falls.
  ``d = goal - w ⊙ keep`` (``goal`` = the row's dense weights, or the dense-target weights that map
  the pruned-model inputs to the dense model's outputs) and ``C`` the inputs' second moment
  ``2/N·XᵀX`` (or their covariance when a bias correction will remove the mean shift). Every row
  keeps its number of zeros, so the sparsity is unchanged. DSnoT itself uses the expected (mean)
  error and a variance-weighted score; this search uses the exact quadratic error instead.

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(400, 8) @ torch.randn(8, 8); W = torch.randn(3, 8)
    >>> C = 2 / 400 * X.T @ X
    >>> keep = torch.rand(3, 8).argsort(1) < 4  # a random half of each row
    >>> err = lambda k: float(((W - W * k) @ C * (W - W * k)).sum())
    >>> new, swaps = refine_mask(W, W, keep, C, max_swaps=16)
    >>> err(new) <= err(keep), bool((new.sum(1) == 4).all())
    (True, True)
"""

from __future__ import annotations

import torch


def ria_score(weight: torch.Tensor, norm: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """RIA importance of a ``(rows, cols)`` weight given its input norms ``‖x_j‖₂`` ``(cols,)``.

    Example:
        >>> s = ria_score(torch.tensor([[1.0, 3.0], [1.0, 1.0]]), torch.tensor([4.0, 1.0]))
        >>> [round(v, 3) for v in s[0].tolist()]
        [1.5, 1.5]
    """
    a = weight.abs().to(torch.float32)  # (rows, cols)
    row = a.sum(1, keepdim=True).clamp_min(1e-12)  # (rows, 1)
    col = a.sum(0, keepdim=True).clamp_min(1e-12)  # (1, cols)
    return (a / row + a / col) * norm.to(torch.float32).clamp_min(0).pow(alpha).reshape(1, -1)


def refine_mask(weight: torch.Tensor, goal: torch.Tensor, keep: torch.Tensor, C: torch.Tensor,
                max_swaps: int, tol: float = 1e-7, candidates: int = 1,
                chunk: int = 64) -> tuple[torch.Tensor, int]:
    """Swap pruned/kept pairs per row while the row's error ``dᵀ C d`` falls (see the module doc).

    Args:
        weight: ``(rows, cols)`` the weights as they will be kept (unchanged by this search).
        goal: ``(rows, cols)`` what the row's output should reproduce through ``C``.
        keep: bool ``(rows, cols)``, True = kept; not modified.
        C: ``(cols, cols)`` symmetric positive semi-definite objective matrix.
        max_swaps: at most this many swaps per row.
        tol: a swap must lower the row's error by more than ``tol`` times its current value.
        candidates: grow candidates tried per row and step (the ``candidates`` best single grows,
            each with its best partner; the best pair wins).
        chunk: rows handled at once (memory ``chunk·candidates·cols`` doubles).

    Returns:
        ``(new keep-mask, number of swaps made over all rows)``.
    """
    keep = keep.clone().bool()
    swaps = 0
    for r0 in range(0, keep.shape[0], chunk):
        sl = slice(r0, r0 + chunk)
        keep[sl], n = _refine_rows(weight[sl].to(torch.float64), goal[sl].to(torch.float64),
                                   keep[sl], C.to(torch.float64), max_swaps, tol, candidates)
        swaps += n
    return keep, swaps


def _refine_rows(W: torch.Tensor, goal: torch.Tensor, keep: torch.Tensor, C: torch.Tensor,
                 max_swaps: int, tol: float, candidates: int) -> tuple[torch.Tensor, int]:
    """:func:`refine_mask` on a few rows (float64 inputs)."""
    d = goal - W * keep  # (rows, cols)
    g = d @ C  # (rows, cols): C d per row
    cd = torch.diagonal(C)  # (cols,)
    err = (d * g).sum(1)  # (rows,)
    active = (~keep).any(1) & keep.any(1)  # rows with something to swap
    rows = torch.arange(W.shape[0])
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    t = max(1, min(candidates, int(keep.shape[1])))
    swaps = 0
    for _ in range(max_swaps):
        if not bool(active.any()):
            break
        r = rows[active]
        a = len(r)
        w, gr, kp = W[r], g[r], keep[r]  # (a, cols)
        grow = torch.where(kp, inf, -2 * w * gr + w * w * cd)  # Δ of returning w_j
        gv, j = grow.topk(min(t, int((~kp).sum(1).min())), dim=1, largest=False)  # (a, t)
        wj = w.gather(1, j)  # (a, t)
        g2 = gr.unsqueeze(1) - wj.unsqueeze(2) * C[j]  # (a, t, cols): C d after each grow
        kp2 = kp.unsqueeze(1).expand_as(g2).clone()
        kp2.scatter_(2, j.unsqueeze(2), False)  # the grown one may not be dropped again
        drop = torch.where(kp2, 2 * w.unsqueeze(1) * g2 + (w * w * cd).unsqueeze(1), inf)
        dv, k = drop.min(2)  # (a, t)
        total = gv + dv  # (a, t)
        best = total.argmin(1)  # (a,)
        ar = torch.arange(a)
        delta, jb, kb = total[ar, best], j[ar, best], k[ar, best]
        ok = delta < -tol * err[r].abs().clamp_min(1e-30)
        if not bool(ok.any()):
            break
        r_ok = r[ok]
        g[r_ok] = g2[ar[ok], best[ok]] + W[r_ok, kb[ok]][:, None] * C[kb[ok]]
        keep[r_ok, jb[ok]] = True
        keep[r_ok, kb[ok]] = False
        err[r_ok] += delta[ok]
        active[r[~ok]] = False
        swaps += int(ok.sum())
    return keep, swaps


__all__ = ["refine_mask", "ria_score"]
