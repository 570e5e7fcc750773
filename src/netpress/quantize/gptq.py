"""GPTQ (Frantar et al. 2022): Hessian-aware group-wise rounding of one Linear layer at a time.

``quantize: {method: gptq, weights: {bits: 4, group_size: 128}, act_order: true, damp: 0.01}``

For a layer ``y = x Wᵀ`` with calibration inputs ``X (N, I)``, GPTQ minimises ``‖X Wᵀ - X Ŵᵀ‖²``
column by column: with ``H = 2 XᵀX / N + λ·mean(diag H)·I`` and the upper Cholesky factor ``U`` of
``H⁻¹``, quantizing column ``j`` leaves the error ``e = (w_j - ŵ_j) / U_jj``, which is spread over
the not-yet-quantized columns ``w_k -= e · U_jk`` (k > j). Updates are applied lazily in blocks of
``block_size`` columns. With ``act_order`` the columns are visited by decreasing ``diag(H)``; the
group scales are then fixed up front from the weights (static groups) so groups stay contiguous in
the stored layout (required by ``MatMulNBits``).

The driver (:func:`netpress.quantize.weight_only.quantize_linears`) quantizes layers in forward
order and captures each layer's inputs with every earlier layer already quantized
(true-sequential), so later layers correct the error of earlier ones.

Example:
    >>> import torch
    >>> from netpress.quantize.gptq import gptq_layer
    >>> _ = torch.manual_seed(0); w = torch.randn(8, 64); x = torch.randn(256, 64)
    >>> codes, scales, zeros = gptq_layer(w, x, bits=4, group_size=32)
    >>> codes.shape, scales.shape, int(codes.max()) <= 15
    (torch.Size([8, 64]), torch.Size([8, 2]), True)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.quantize.sequential import trim_heap
from netpress.quantize.weight_only import (
    GPTQConfig,
    clipped_qparams,
    lowbit_from_codes,
    quantize_linears,
)


def hessian(x: torch.Tensor, chunk: int = 256, perm: torch.Tensor | None = None) -> torch.Tensor:
    """``H = 2 XᵀX / N`` of inputs ``x (N, I)`` in float64 -> ``(I, I)``.

    Accumulated over ``chunk`` rows at a time, so the float64 copy of ``x`` is never whole (256
    rows: as fast as 1024, a quarter of the buffer). With ``perm`` the columns of ``x`` are taken
    in that order, i.e. the result is ``H[perm][:, perm]`` without a second ``(I, I)`` buffer.

    Example:
        >>> x = torch.randn(100, 4)
        >>> torch.allclose(hessian(x), 2 * x.double().T @ x.double() / 100)
        True
    """
    h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        xd = (x[i:i + chunk] if perm is None else x[i:i + chunk, perm]).to(torch.float64)
        h.addmm_(xd.T, xd)
        del xd
    return h.mul_(2.0 / max(1, x.shape[0]))


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``h⁻¹`` (``UᵀU = h⁻¹``, float64), in ``h``'s own memory.

    scipy's ``potrf``/``potri``/``potrf`` run in place on the Fortran view of ``h``: for a
    symmetric matrix that view is the same matrix, every step reads and writes only the lower
    triangle, and the final lower factor ``L`` (``LLᵀ = h⁻¹``), stored column-major, is
    ``U = Lᵀ`` read row-major, so no ``(I, I)`` temporary is made (MiniLM's 1536-wide layers: the
    former symmetrisation and copy took three more 18 MiB buffers). Without scipy, through torch.
    """
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover - scikit-learn brings scipy
        linv = torch.linalg.solve_triangular(torch.linalg.cholesky(h), torch.eye(
            h.shape[0], dtype=h.dtype), upper=False)
        return torch.linalg.cholesky(linv.T @ linv, upper=True)
    f = h.numpy().T  # Fortran-ordered view of the same (symmetric) matrix
    c, info = lapack.dpotrf(f, lower=True, overwrite_a=True, clean=False)
    if info == 0:
        c, info = lapack.dpotri(c, lower=True, overwrite_c=True)  # lower triangle of h⁻¹
    if info != 0:
        raise torch.linalg.LinAlgError(f"Hessian not positive definite (LAPACK info {info})")
    c, info = lapack.dpotrf(c, lower=True, overwrite_a=True, clean=True)  # upper zeroed
    if info != 0:
        raise torch.linalg.LinAlgError(f"H^-1 not positive definite (LAPACK info {info})")
    if not np.shares_memory(c, f):  # pragma: no cover - LAPACK wrappers copied after all
        return torch.from_numpy(np.ascontiguousarray(c.T))
    return h  # its memory now holds U row-major


class HessianStats:
    """GPTQ's statistics of one layer's inputs, accumulated as they arrive; the inputs are never
    held whole.

    :meth:`add` takes rows ``(n, I)`` in any number of pieces; they are cut into chunks of
    ``chunk`` rows of the concatenated stream (the chunks :func:`hessian` would make of the stacked
    inputs, so the sums are bit-identical), each adding to ``diag(XᵀX)`` and ``XᵀX`` (float64).
    :meth:`inverse` then gives the upper Cholesky factor of the damped ``H⁻¹`` in visiting order,
    computed once and shared by the layers fed the same inputs (query, key, value). Memory: the
    ``(I, I)`` float64 buffer and one chunk, against the ``(N, I)`` inputs (MiniLM's FFN output
    layer: 18 MiB + 1.5 MiB instead of 18 + 15 MiB).

    Example:
        >>> x = torch.randn(300, 16)
        >>> stats = HessianStats(act_order=False); stats.add(x[:100]); stats.add(x[100:])
        >>> u, perm, dead = stats.inverse()
        >>> h = 2 * x.double().T @ x.double() / 300
        >>> h += 0.01 * h.diagonal().mean() * torch.eye(16, dtype=torch.float64)
        >>> torch.allclose(u.T @ u, torch.linalg.inv(h))
        True
    """

    def __init__(self, damp: float = 0.01, act_order: bool = True, chunk: int = 256) -> None:
        self.damp, self.act_order, self.chunk = damp, act_order, chunk
        self.n = 0
        self.h: torch.Tensor | None = None  # XᵀX so far, then the inverse factor
        self.diag: torch.Tensor | None = None
        self._buf: torch.Tensor | None = None  # (chunk, I) rows waiting for a full chunk
        self._fill = 0
        self._done: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._uses: int | None = None  # layers still to use the inverse (None: keep it)

    def expect_uses(self, n: int) -> None:
        """Free the inverse once ``n`` layers have been quantized from it (:meth:`used`)."""
        self._uses = n

    def used(self) -> None:
        """One layer is done with the inverse (freed after the last one, see
        :meth:`expect_uses`)."""
        if self._uses is not None:
            self._uses -= 1
            if self._uses <= 0:
                self._done = None

    def add(self, x: torch.Tensor) -> None:
        """Add rows ``x (n, I)`` of the layer's inputs."""
        assert self._done is None, "inputs added after the inverse was taken"
        if self._buf is None:
            i = x.shape[1]
            self._buf = torch.empty(self.chunk, i, dtype=torch.float32)
            self.h = torch.zeros(i, i, dtype=torch.float64)
            self.diag = torch.zeros(i, dtype=torch.float64)
        self.n += x.shape[0]
        at = 0
        while at < x.shape[0]:
            take = min(self.chunk - self._fill, x.shape[0] - at)
            self._buf[self._fill:self._fill + take] = x[at:at + take]
            self._fill += take
            at += take
            if self._fill == self.chunk:
                self._flush()

    def _flush(self) -> None:
        assert self._buf is not None and self.h is not None and self.diag is not None
        if self._fill:
            xd = self._buf[:self._fill].to(torch.float64)
            self.diag += xd.square().sum(0)
            self.h.addmm_(xd.T, xd)
            del xd
        self._fill = 0

    def inverse(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, perm, dead)``: the upper Cholesky factor of the damped ``H⁻¹`` (float64, rows and
        columns in visiting order: by decreasing ``diag(H)`` with ``act_order``), the visiting
        order, and the mask of never-active input columns (original order). Computed once.

        Raises:
            torch.linalg.LinAlgError: the damped Hessian is not positive definite.
        """
        if self._done is None:
            assert self.h is not None and self.diag is not None, "no inputs were added, or the " \
                "inverse was freed after its last use"
            self._flush()
            self._buf = None
            dead = self.diag == 0
            perm = (torch.argsort(self.diag, descending=True) if self.act_order
                    else torch.arange(len(self.diag)))
            h = _permute_symmetric(self.h.mul_(2.0 / max(1, self.n)), perm)
            self.h = None
            dp = dead[perm]
            h[dp, dp] = 1.0
            h.diagonal().add_(self.damp * torch.mean(torch.diag(h)))
            trim_heap()
            self._done = (_inverse_cholesky(h), perm, dead)
            del h
            trim_heap()
        return self._done


def _permute_symmetric(h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``h[perm][:, perm]`` in ``h``'s own memory (columns 64 rows at a time, rows by cycles)."""
    n = h.shape[0]
    if torch.equal(perm, torch.arange(n)):
        return h
    for i in range(0, n, 64):
        h[i:i + 64] = h[i:i + 64][:, perm]
    p, done = perm.tolist(), [False] * n
    for s in range(n):  # row j takes row p[j]: follow each cycle with one row saved
        if done[s]:
            continue
        saved, j = h[s].clone(), s
        while True:
            done[j] = True
            k = p[j]
            if k == s:
                h[j] = saved
                break
            h[j] = h[k]
            j = k
    return h


def _static_qparams(w: torch.Tensor, dead: torch.Tensor, bits: int, group_size: int,
                    clip_search: bool, rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales/zeros of ``w (O, I)`` (dead columns zeroed), ``rows`` groups at a time: the
    clip search's temporaries stay small (each group is searched on its own: same numbers)."""
    out_f = w.shape[0]
    groups = w.detach().to(torch.float32).masked_fill(dead, 0.0).reshape(-1, group_size)
    s, z = torch.empty(groups.shape[0]), torch.empty(groups.shape[0])
    for r in range(0, groups.shape[0], rows):
        s[r:r + rows], z[r:r + rows] = clipped_qparams(groups[r:r + rows], bits, clip_search)
    return s.reshape(out_f, -1), z.reshape(out_f, -1)


def gptq_layer(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
               act_order: bool = True, block_size: int = 128, clip_search: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of one weight ``w (O, I)`` given its inputs ``x (N, I)``.

    The inputs go through a :class:`HessianStats`, then :func:`gptq_from_stats`. The stage itself
    feeds the statistics as the inputs are captured (:func:`quantize_gptq`), never holding ``x``.

    Args:
        w: the float weight.
        x: calibration inputs of the layer (padding removed).
        bits, group_size: the code width and group size (``group_size`` divides ``I``).
        damp: Hessian damping as a fraction of the mean diagonal.
        act_order: visit columns by decreasing ``diag(H)``.
        block_size: columns per lazy update.
        clip_search: MSE search of each group's clipping range.

    Returns:
        ``(codes (O, I), scales (O, I/g), zeros (O, I/g))``, float32, in the original column order.
    """
    stats = HessianStats(damp, act_order)
    stats.add(x)
    return gptq_from_stats(w, stats, bits, group_size, block_size, clip_search)


def gptq_from_stats(w: torch.Tensor, stats: HessianStats, bits: int, group_size: int,
                    block_size: int = 128, clip_search: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of one weight ``w (O, I)`` from its inputs' :class:`HessianStats`.

    Memory: the shared ``(I, I)`` float64 factor, and two ``(I, O)`` copies of the weight (the
    float64 working copy and the float32 codes; MiniLM's widest layer: 18 + 4.5 + 2.25 MiB).

    Returns:
        ``(codes (O, I), scales (O, I/g), zeros (O, I/g))``, float32, in the original column order.

    Example:
        >>> w, x = torch.randn(8, 64), torch.randn(256, 64)
        >>> stats = HessianStats(); stats.add(x)
        >>> codes, scales, zeros = gptq_from_stats(w, stats, bits=4, group_size=32)
        >>> torch.equal(codes, gptq_layer(w, x, bits=4, group_size=32)[0])
        True
    """
    out_f, in_f = w.shape
    n_groups = in_f // group_size
    hinv, perm, dead = stats.inverse()
    if stats.act_order:
        # static groups: scales from the (un-updated) weights, so groups stay contiguous
        s, z = _static_qparams(w, dead, bits, group_size, clip_search)
        scales, zeros = s.double(), z.double()
        del s, z
    else:
        scales = torch.zeros(out_f, n_groups, dtype=torch.float64)
        zeros = torch.zeros_like(scales)
        block_size = max(block_size // group_size, 1) * group_size  # groups inside one block
    wt = w.detach().T[perm].to(torch.float64)  # (I, O) working copy, visiting order
    wt[dead[perm]] = 0.0
    trim_heap()
    codes = _sweep(wt.numpy(), hinv.numpy(), perm.numpy(), scales.numpy(), zeros.numpy(), bits,
                   group_size, block_size, None if stats.act_order else clip_search)
    del wt, hinv
    stats.used()  # the last layer fed these inputs frees the (I, I) factor before packing
    trim_heap()
    return torch.from_numpy(codes).T.contiguous(), scales.float(), zeros.float()


def _sweep(wt: np.ndarray, hinv: np.ndarray, perm: np.ndarray, scales: np.ndarray,
           zeros: np.ndarray, bits: int, group_size: int, block_size: int,
           dynamic_clip: bool | None) -> np.ndarray:
    """The GPTQ column sweep on ``wt (I, O)`` (the transposed weight, rows in visiting order,
    updated in place) and upper Cholesky ``hinv (I, I)`` (float64, same order).

    Runs in numpy: each column is a handful of length-``O`` vector ops, where torch's per-call
    overhead (tens of µs) dominated (MiniLM: ~20,000 columns). The weight is held transposed so
    every column is a contiguous row and its error update one ``np.outer``. ``perm[j]`` is the
    original index of visited column ``j``; its codes are written to row ``perm[j]`` of the
    result. ``dynamic_clip`` is ``None`` for static (precomputed) groups, else whether the group
    scales computed at each group's first column use the MSE clip search. ``scales`` / ``zeros``
    ``(O, G)`` are filled in place in the dynamic case.

    Returns:
        float32 codes ``(I, O)`` in the original column order (the transposed code matrix).
    """
    from netpress.quantize.weight_only import clipped_qparams

    maxq = float((1 << bits) - 1)
    in_f, out_f = wt.shape
    codes = np.empty((in_f, out_f), dtype=np.float32)
    st, zt = np.ascontiguousarray(scales.T), np.ascontiguousarray(zeros.T)  # (G, O)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = wt[i1:i2].copy()  # (b, O)
        err1 = np.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group_size
            if dynamic_clip is not None and col % group_size == 0:
                # dynamic groups (sequential order): range of the group's current weights
                sg, zg = clipped_qparams(torch.from_numpy(w1[i:i + group_size].T).float(), bits,
                                         dynamic_clip)
                st[g], zt[g] = sg.double().numpy(), zg.double().numpy()
            wcol, s, z = w1[i], st[g], zt[g]
            q = np.rint(wcol / s)
            q += z
            np.clip(q, 0.0, maxq, out=q)
            codes[col] = q
            e = (wcol - (q - z) * s) / hinv1[i, i]  # (O,)
            w1[i:] -= np.outer(hinv1[i, i:], e)
            err1[i] = e
        for r in range(i2, in_f, 256):  # lazy batch update, 256 rows at a time (small temporary)
            wt[r:r + 256] -= hinv[i1:i2, r:r + 256].T @ err1
    scales[...], zeros[...] = st.T, zt.T
    return codes


@register("quantize", "gptq", GPTQConfig,
          summary="weight-only int2..int8 GPTQ (Hessian-aware, act-order, true-sequential), packed")
def quantize_gptq(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """GPTQ of the targeted Linear layers (in place), one layer at a time in forward order.

    Args:
        model: the model (modified and returned).
        config: a :class:`~netpress.quantize.weight_only.GPTQConfig`.
        ctx: ``ctx.data`` holds the calibration batches; ``ctx.report["gptq"]`` is filled.

    Returns:
        ``model`` with :class:`~netpress.nn.lowbit.LowBitLinear` layers.

    Raises:
        DataError: empty calibration set, NaN/Inf in a layer's inputs.
        RecipeError: a group size that does not divide a layer's in_features (layer named).
        ModelError: NaN/Inf in a weight.

    Example:
        >>> import torch, torch.nn as nn
        >>> from netpress.core.data import Batch
        >>> ctx = StageContext(data=[Batch((torch.randn(64, 32),))])
        >>> m = quantize_gptq(nn.Sequential(nn.Linear(32, 4)), GPTQConfig(weights={"group_size": 32}), ctx)
        >>> type(m[0]).__name__
        'LowBitLinear'
    """
    assert isinstance(config, GPTQConfig)
    bits, group = config.weights.bits, config.weights.group_size

    def layer(name: str, module: nn.Linear, stats: HessianStats | None) -> nn.Module:
        assert isinstance(stats, HessianStats)
        codes, scales, zeros = gptq_from_stats(module.weight, stats, bits, group,
                                               config.block_size, config.clip_search)
        return lowbit_from_codes(codes, scales, zeros, bits, module.bias)

    return quantize_linears(model, config, ctx, layer, needs_data=True,
                            sink=lambda: HessianStats(config.damp, config.act_order))


__all__ = ["HessianStats", "gptq_from_stats", "gptq_layer", "hessian", "quantize_gptq"]
