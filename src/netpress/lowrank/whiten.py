"""Activation-aware SVD (SVD-LLM style): truncate ``W`` where the layer's real inputs live.

Plain SVD minimises ``‖W - W'‖_F``; what matters is the output on real inputs, ``‖(W - W')X‖_F``.
With the input second moment ``C = XXᵀ = SSᵀ`` (Cholesky, damped), the best rank-``r`` ``W'`` is
``trunc_r(W·S)·S⁻¹`` (Eckart-Young on ``W·S``), so the factors are

    first  = √Σ_r·V_rᵀ·S⁻¹  (r, I)        second = U_r·√Σ_r  (O, r),   W·S = U·Σ·Vᵀ.

Layers are compressed one after another in forward order; each one's statistics come from the
calibration data run through the model *as compressed so far* (``X'``) and through the original
(``X``), and the target is the original output: ``W_ls = W·(X X'ᵀ)(X' X'ᵀ)⁻¹`` is fitted on ``X'``
first (the least-squares correction for the error of the earlier layers), then truncated as above
with ``C = X' X'ᵀ``. Padding tokens (attention mask 0) are left out of the statistics.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.lowrank.whiten import whitened_factors
    >>> _ = torch.manual_seed(0)
    >>> w = torch.randn(8, 6); x = torch.randn(6, 200) * torch.tensor([5., 5., .1, .1, .1, .1])[:, None]
    >>> a, b = whitened_factors(w, x @ x.T, 2)
    >>> plain = torch.linalg.svd(w)
    >>> p = plain.U[:, :2] @ torch.diag(plain.S[:2]) @ plain.Vh[:2]
    >>> bool(((w - b @ a) @ x).norm() < ((w - p) @ x).norm())
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from netpress.core.data import Batch
from netpress.core.errors import DataError


def whitened_factors(w: torch.Tensor, cov: torch.Tensor, rank: int,
                     damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first (r, I), second (O, r))`` minimising ``‖(W - second·first)·X‖`` for ``XXᵀ = cov``.

    Args:
        w: weight ``(O, I)``.
        cov: input second moment ``(I, I)`` (symmetric PSD).
        rank: ``r``.
        damping: added to the diagonal, times its mean (keeps the Cholesky factor invertible).
    """
    w, cov = w.double(), cov.double().to(w.device)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    cov = cov + damping * cov.diagonal().mean().clamp(min=1e-12) * eye
    s = torch.linalg.cholesky(cov)  # (I, I) lower, cov = S Sᵀ
    u, sig, vh = torch.linalg.svd(w @ s, full_matrices=False)  # (O, k), (k,), (k, I)
    root = sig[:rank].sqrt()
    # Vᵀ S⁻¹ = (S⁻ᵀ V)ᵀ: solve Sᵀ Z = V
    z = torch.linalg.solve_triangular(s.T, vh[:rank].T, upper=True)  # (I, r)
    return (root[:, None] * z.T).float(), (u[:, :rank] * root[None, :]).float()


class _Stats:
    """Input moments of one Linear: ``X'X'ᵀ`` (compressed model) and ``X X'ᵀ`` (original × it)."""

    def __init__(self, dim: int) -> None:
        self.cc = torch.zeros(dim, dim, dtype=torch.float64)
        self.oc = torch.zeros(dim, dim, dtype=torch.float64)
        self.n = 0
        self.cur: torch.Tensor | None = None
        self.orig: torch.Tensor | None = None


def _flat(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(..., I)`` -> ``(N, I)`` float64, padding tokens dropped."""
    if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
        x = x[mask.bool()]
    return x.reshape(-1, x.shape[-1]).double()


@contextlib.contextmanager
def _capture(module: nn.Module, slot: dict[str, Any], key: str) -> Iterator[None]:
    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        slot[key] = args[0].detach()

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_moments(model: nn.Module, original: nn.Module, name: str,
                  batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(X'X'ᵀ, X X'ᵀ, tokens)`` of layer ``name``'s inputs over ``batches``.

    Raises:
        DataError: no batches, or the layer saw no input.
    """
    if not batches:
        raise DataError("lowrank.activation_aware", got="no calibration data",
                        expected="calibration batches", fix="use a zoo data set or pass data")
    mine, theirs = model.get_submodule(name), original.get_submodule(name)
    slot: dict[str, Any] = {}
    cc = oc = None
    n = 0
    with _capture(mine, slot, "cur"), _capture(theirs, slot, "orig"):
        for b in batches:
            slot.clear()
            b.run(model)
            b.run(original)
            if "cur" not in slot or "orig" not in slot:
                raise DataError(f"lowrank.activation_aware layer {name!r}", got="no input seen",
                                expected="a layer on the forward path", fix=f"ignore {name!r}")
            xc, xo = _flat(slot["cur"], b.mask), _flat(slot["orig"], b.mask)  # (N, I)
            cc = xc.T @ xc if cc is None else cc + xc.T @ xc
            oc = xo.T @ xc if oc is None else oc + xo.T @ xc
            n += xc.shape[0]
    assert cc is not None and oc is not None
    return cc, oc, n


def corrected_weight(w: torch.Tensor, cc: torch.Tensor, oc: torch.Tensor,
                     damping: float = 0.01) -> torch.Tensor:
    """``W·(X X'ᵀ)(X'X'ᵀ + λI)⁻¹``: the dense weight that best maps the current inputs to the
    original outputs (``W`` itself when the inputs are unchanged)."""
    eye = torch.eye(cc.shape[0], dtype=torch.float64, device=cc.device)
    reg = cc + damping * cc.diagonal().mean().clamp(min=1e-12) * eye
    return w.double() @ torch.linalg.solve(reg, oc.T).T  # (O, I)


__all__ = ["corrected_weight", "layer_moments", "whitened_factors"]
