"""SparseGPT (Frantar & Alistarh 2023, SPEC P3): OBS row updates with the layer Hessian.

Layers are processed one at a time, in definition order (true-sequential). For each layer a
pre-forward hook sees its inputs ``X`` while the calibration batches run through the *already
pruned* earlier layers (the forward stops at the layer, and the hook is removed); the layer
Hessian is ``H = 2/N · XᵀX`` (padding tokens excluded; conv inputs unfolded into patches),
accumulated batch by batch (no layer's inputs are kept). In a transformer the runs start from the
cached inputs of the layer's block (:func:`netpress.prune.scores.sequential_runs`), so a layer costs
part of one block's forward, not a forward of the model up to it. Then the
standard blocked algorithm with lazy updates runs on ``W (rows, cols)``:

  * dampen ``H += λ·mean(diag H)·I`` and take ``U = chol(H⁻¹)ᵀ`` (upper Cholesky of the inverse);
  * for each block of ``blocksize`` columns, choose the mask inside the block (adaptive: the
    ``p`` fraction of ``w²/U_jj²`` lowest of the block, or N:M per group of M columns);
  * column by column, zero the pruned weights and spread their error over the remaining
    columns of the block: ``W[:, j:] -= (err_j) ⊗ U[j, j:]`` with ``err_j = (w_j - q_j)/U_jj``;
  * after the block, apply the accumulated error to all later columns at once (lazy update).

Example:
    >>> import torch, torch.nn as nn, netpress
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(16, 8))
    >>> X = torch.randn(256, 16)
    >>> pruned = netpress.prune(model, {"method": "sparsegpt", "sparsity": 0.5}, data=X)
    >>> int((pruned[0].weight == 0).sum())
    64
"""

from __future__ import annotations

import copy
import time
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.errors import RecipeError
from netpress.core.progress import track
from netpress.prune.nm import check_nm_shape
from netpress.prune.options import NMFields
from netpress.prune.owl import OWLFields, layer_sparsities, type_sparsities
from netpress.prune.scores import (
    calibration_data,
    masks_from_scores,
    prunable,
    row_masks,
    run_inputs,
    sequential_runs,
    summary,
)
from netpress.quantize.sequential import trim_heap


class SparseGPTPruneConfig(NMFields, OWLFields, TechniqueConfig):
    """Config of ``sparsegpt`` pruning.

    Attributes:
        sparsity: fraction removed per layer in [0, 1), or ``"2:4"`` / ``"4:8"`` (``n``, ``m``).
        blocksize: columns per lazy-update block (also the adaptive-mask block).
        damp: dampening ``λ`` as a fraction of ``mean(diag H)``.
        max_batches: use at most this many calibration batches.
        bias_correction: after pruning a layer, add ``(W - W_pruned)·mean(x)`` to its bias
            (``x`` its calibration inputs; the mean output shift removed).
        target: ``weights`` fits the layer's own dense weights on the pruned-model inputs (the
            paper); ``dense`` fits the *dense model's* layer outputs (inputs from a dense copy,
            pushed block by block alongside; :func:`dense_target`), at one more model in memory.
        refit_norms: with ``target: dense``, refit each LayerNorm that follows a pruned layer
            (before the next one is pruned) to the dense model's outputs (:func:`refit_norm`).
        exact_refit: after the sweep has chosen the mask, re-solve each row's kept weights
            exactly (:func:`refit_kept`; least squares on the calibration inputs, to the same
            target) instead of keeping the sweep's one-directional updates (MiniLM, dense target +
            LayerNorm refit + bias correction, 573 held-out sentences: 50% cosine 0.9572 ->
            0.9649, 2:4 0.9292 -> 0.9415).
        mask: ``obs`` (SparseGPT's adaptive ``w²/[H⁻¹]_jj²`` per block) or ``wanda``: each row
            keeps its highest ``|w|·‖x_j‖`` (Wanda's score, on the weights being fitted and the
            inputs through the pruned model); the kept weights are then updated all the same.
        type_sparsity: ``{pattern: fraction}`` overriding ``sparsity`` per layer type (patterns
            as ``targets``: a module name, a class name or ``re:REGEX``; the first match wins),
            e.g. ``{"re:.*\\.query": 0.6}``; the report's ``sparsity`` is the overall fraction.
        owl_lambda / owl_m: outlier-weighted block sparsities (0 = uniform), see
            :mod:`netpress.prune.owl`.
        targets / ignore: module patterns (default: Linear, Conv1d, Conv2d).
    """

    method: Literal["sparsegpt"] = "sparsegpt"
    blocksize: int = Field(default=128, ge=1, le=65536)
    damp: float = Field(default=0.01, gt=0.0, le=1.0)
    max_batches: int | None = Field(default=None, ge=1)
    bias_correction: bool = False
    target: Literal["weights", "dense"] = "weights"
    refit_norms: bool = False
    exact_refit: bool = False
    mask: Literal["obs", "wanda"] = "obs"
    type_sparsity: dict[str, float] = Field(default_factory=dict)
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_target(self) -> SparseGPTPruneConfig:
        if (self.sparsity is None) == (self.n is None):
            raise ValueError("give exactly one of `sparsity` (e.g. 0.5) or an N:M pattern "
                             "(sparsity: '2:4')")
        if self.nm is not None and self.blocksize % self.nm[1]:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of M={self.nm[1]}")
        if self.refit_norms and self.target != "dense":
            raise ValueError("refit_norms fits the dense model's LayerNorm outputs; "
                             "it needs target: dense")
        if self.type_sparsity and (self.nm is not None or self.owl_lambda):
            raise ValueError("type_sparsity needs a fractional sparsity and owl_lambda: 0")
        bad = {k: v for k, v in self.type_sparsity.items() if not 0.0 <= v < 1.0}
        if bad:
            raise ValueError(f"type_sparsity fractions must be in [0, 1), got {bad}")
        if self.owl_lambda and self.nm is not None:
            raise ValueError("owl_lambda needs a fractional sparsity (N:M fixes the per-layer "
                             "fraction); set owl_lambda: 0")
        return self


def layer_hessian(
    model: nn.Module, name: str, module: nn.Module, batches: list
) -> tuple[torch.Tensor, int]:
    """``H = 2/N · XᵀX`` of one layer's inputs ``X (N, cols)`` through ``model`` as it is now.

    Returns:
        ``(H (cols, cols) float32, N)``.

    Raises:
        RecipeError: the calibration forward pass never reaches the layer.
    """
    from netpress.quantize.sequential import model_runs

    st = layer_stats(model_runs(model, batches), name, module)
    return st["H"], int(st["n"])  # type: ignore[return-value]


def layer_stats(
    runs: list, name: str, module: nn.Module, dense_runs: list | None = None,
    dense_module: nn.Module | None = None,
) -> dict[str, torch.Tensor | int]:
    """Second moments of the layer's inputs ``X (N, cols)`` on ``runs``.

    Returns ``{"H": 2/N·XᵀX (cols, cols), "n": N, "mean": mean(X) (cols,)}``; with ``dense_runs``
    (the same batches through the dense model, reaching ``dense_module``) also
    ``"G": 2/N·X_denseᵀX`` and ``"mean_dense"``. Each run's products are taken in float32 (a few
    hundred rows) and summed in float64; no run's rows are kept.

    Raises:
        RecipeError: no run reaches the layer.
    """
    acc: dict[str, torch.Tensor] = {}
    count = [0]
    last: list[torch.Tensor] = []

    def add(key: str, value: torch.Tensor) -> None:
        if key in acc:  # in place, the float32 value widened element by element (same sums)
            acc[key].add_(value)
        else:
            acc[key] = value.to(torch.float64)

    def grab(rows: torch.Tensor) -> None:  # rows (N, cols)
        last.append(rows)

    pairs = zip(runs, dense_runs, strict=True) if dense_runs is not None \
        else ((r, None) for r in runs)
    for run, dense_run in pairs:
        last.clear()
        run_inputs([run], name, module, grab)
        if not last:
            continue
        x = last[0]  # (N, cols)
        add("H", x.T @ x)
        add("s", x.sum(0))
        count[0] += x.shape[0]
        if dense_run is not None and dense_module is not None:
            run_inputs([dense_run], name, dense_module, grab)
            xd = last[1]  # (N, cols), the same tokens through the dense model
            add("G", xd.T @ x)
            add("sd", xd.sum(0))
    n = count[0]
    if not n:
        raise RecipeError(name, got="a layer the calibration forward pass never reached",
                          expected="layers used by model(inputs)", fix=f"add {name!r} to `ignore`")
    out: dict[str, torch.Tensor | int] = {
        "H": acc.pop("H").mul_(2.0 / n).to(torch.float32), "n": n,
        "mean": (acc["s"] / n).to(torch.float32)}
    if "G" in acc:
        out["G"] = acc.pop("G").mul_(2.0 / n).to(torch.float32)
        out["mean_dense"] = (acc["sd"] / n).to(torch.float32)
    return out


def dense_target(weight: torch.Tensor, H: torch.Tensor, G: torch.Tensor,
                 damp: float) -> torch.Tensor:
    """``W' = W·G·(H + λI)⁻¹``: the dense weights that best map the pruned-model inputs to the
    dense model's outputs (``‖X_d Wᵀ - X Qᵀ‖² = ‖X (W' - Q)ᵀ‖² + const``), so pruning ``W'`` with
    ``H`` fits the dense model's outputs, undoing the drift of the earlier pruned layers.

    Example:
        >>> X = torch.randn(200, 6); W = torch.randn(3, 6)
        >>> H = 2 / 200 * X.T @ X
        >>> bool(torch.allclose(dense_target(W, H, H, 1e-9), W, atol=1e-4))
        True
    """
    Hd = H.to(torch.float64).clone()
    Hd.diagonal().add_(damp * float(torch.diag(Hd).mean()))
    rhs = (weight.to(torch.float64) @ G.to(torch.float64)).T  # (cols, rows)
    return torch.linalg.solve(Hd, rhs).T.to(torch.float32).contiguous()  # (rows, cols)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    prune_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Prune one weight matrix with OBS updates; the input tensors are not modified.

    Args:
        weight: ``(rows, cols)`` (a conv weight flattened with ``flatten(1)``).
        hessian: ``(cols, cols)`` layer Hessian ``2/N·XᵀX``.
        sparsity: fraction zeroed (per block of columns), or ``nm`` = ``(n, m)`` kept per group.
        blocksize: lazy-update block width.
        damp: dampening fraction of ``mean(diag H)``.
        prune_mask: bool ``(rows, cols)``, True = pruned: a mask chosen elsewhere (e.g. Wanda's);
            only the OBS updates of the kept weights run (``sparsity`` / ``nm`` are ignored).

    Returns:
        ``(pruned weight (rows, cols) float32, reconstruction loss Σ err²/2)``.

    Example:
        >>> W = torch.randn(4, 8); X = torch.randn(100, 8)
        >>> Q, _ = sparsegpt_prune(W, 2 / 100 * X.T @ X, sparsity=0.5)
        >>> int((Q == 0).sum())
        16
    """
    W = weight.detach().clone().to(torch.float32)  # (rows, cols)
    H = hessian.detach().clone().to(torch.float32)  # (cols, cols)
    rows, cols = W.shape
    dead = torch.diag(H) == 0  # inputs that are always zero: their weights are free to drop
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    idx = torch.arange(cols)
    H[idx, idx] += damp * torch.mean(torch.diag(H))
    Hinv = _upper_chol_inverse(H)  # (cols, cols), upper triangular
    loss = torch.zeros(rows)
    mask = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # (rows, B)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
        d1 = torch.diag(Hinv1)  # (B,)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if prune_mask is not None:
            mask1 = prune_mask[:, i1:i2].clone()
        elif nm is None:
            tmp = W1.square() / d1.reshape(1, -1).square()  # OBS saliency w²/[H⁻¹]_jj²
            k = int(tmp.numel() * float(sparsity or 0.0))
            if k > 0:
                order = torch.argsort(tmp.reshape(-1), stable=True)[:k]
                mask1.view(-1)[order] = True
        for i in range(count):
            w = W1[:, i]  # (rows,)
            d = Hinv1[i, i]
            if prune_mask is None and nm is not None and i % nm[1] == 0:
                n, m = nm
                tmp = W1[:, i:i + m].square() / d1[i:i + m].reshape(1, -1).square()  # (rows, m)
                drop = torch.topk(tmp, m - n, dim=1, largest=False).indices  # (rows, m-n)
                mask1.scatter_(1, i + drop, True)
            q = w.clone()
            q[mask1[:, i]] = 0.0
            Q1[:, i] = q
            loss += (w - q).square() / d.square() / 2
            err = (w - q) / d  # (rows,)
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # (rows, B-i)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the later columns
    W[mask] = 0.0  # exact zeros (never -0.0 from the updates)
    return W.masked_fill(W == 0, 0.0), float(loss.sum())


def refit_kept(goal: torch.Tensor, hessian: torch.Tensor, pruned: torch.Tensor, damp: float,
               chunk: int = 16) -> torch.Tensor:
    """Re-solve each row's kept weights exactly for a fixed mask (least squares with ``H``).

    Row ``r`` minimises ``(q - g_r)ᵀ Ĥ (q - g_r)`` with ``q_j = 0`` where ``pruned[r, j]``
    (``Ĥ = H + λ·mean(diag H)·I``, ``g = goal``): ``q_S = Ĥ_SS⁻¹ (Ĥ g_r)_S`` on the kept set ``S``.
    SparseGPT's sweep only updates the columns *after* each pruned one (earlier ones are frozen),
    so for the same mask this is never worse on the calibration objective. Rows are solved in
    chunks on the kept columns only (``O(rows·k³)`` with ``k`` kept per row; float32 Cholesky of
    the damped ``Ĥ_SS``, right-hand sides formed in float64).

    Args:
        goal: ``(rows, cols)`` dense weights to fit (the layer's own, or :func:`dense_target`).
        hessian: ``(cols, cols)`` ``2/N·XᵀX`` of the layer's inputs.
        pruned: bool ``(rows, cols)``, True = pruned (stays exactly zero).
        damp: dampening fraction of ``mean(diag H)``.
        chunk: rows solved at once (memory ``chunk·k²`` floats).

    Returns:
        ``(rows, cols)`` float32 weights, exact zeros where ``pruned``.

    Example:
        >>> X = torch.randn(300, 6); W = torch.randn(2, 6)
        >>> mask = torch.tensor([[True, False] * 3] * 2)
        >>> Q = refit_kept(W, 2 / 300 * X.T @ X, mask, 1e-9)
        >>> ls = torch.linalg.lstsq(X[:, 1::2], X @ W.T).solution.T  # the kept columns only
        >>> bool(torch.allclose(Q[:, 1::2], ls, atol=1e-4)), bool((Q[:, ::2] == 0).all())
        (True, True)
    """
    Hd = hessian.to(torch.float64).clone()
    cols = Hd.shape[0]
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1.0
    Hd.diagonal().add_(damp * float(torch.diag(Hd).mean()))
    G = goal.to(torch.float64)
    B = (G @ Hd).to(torch.float32)  # (rows, cols): Ĥ g_r per row
    H32 = Hd.to(torch.float32)
    keep = ~pruned.bool() & ~dead.unsqueeze(0)
    out = torch.zeros(G.shape, dtype=torch.float32)
    for r0 in range(0, G.shape[0], chunk):
        kp = keep[r0:r0 + chunk]  # (c, cols)
        counts = kp.sum(1)  # (c,)
        k = int(counts.max())
        if k == 0:
            continue
        idx = torch.argsort((~kp).to(torch.int8), dim=1, stable=True)[:, :k]  # kept first
        valid = torch.arange(k).unsqueeze(0) < counts.unsqueeze(1)  # (c, k)
        sub = H32[idx.unsqueeze(2), idx.unsqueeze(1)]  # (c, k, k)
        both = valid.unsqueeze(2) & valid.unsqueeze(1)
        eye = torch.eye(k).expand_as(sub)
        sub = torch.where(both, sub, eye)  # padding: identity rows/cols, zero right-hand side
        rhs = torch.where(valid, B[r0:r0 + chunk].gather(1, idx), 0.0)  # (c, k)
        L, info = torch.linalg.cholesky_ex(sub)
        if bool((info != 0).any()):
            sol = torch.linalg.solve(sub, rhs)
        else:
            sol = torch.cholesky_solve(rhs.unsqueeze(2), L).squeeze(2)
        out[r0:r0 + chunk].scatter_(1, idx, torch.where(valid, sol, 0.0))
    assert out.shape[1] == cols
    return out.masked_fill(~keep, 0.0)


def _upper_chol_inverse(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹``, adding more damping if ``H`` is not positive definite."""
    extra = 0.0
    for _ in range(8):
        try:  # one (cols, cols) temporary alive at a time beside H (MiniLM FFN-out: 9 MiB each)
            L = torch.linalg.cholesky(H + extra * torch.eye(H.shape[0]) if extra else H)
            Hinv = torch.cholesky_inverse(L)
            del L
            return torch.linalg.cholesky(Hinv, upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            extra = max(extra * 10, 1e-6 * float(torch.diag(H).abs().mean()) + 1e-8)
    raise RecipeError("sparsegpt", got="a layer Hessian that is not positive definite",
                      expected="calibration inputs that span the layer's input space",
                      fix="raise `damp` (e.g. 0.1) or use more calibration data")


def _norms_after(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """For each targeted layer, the LayerNorms after it and before the next targeted layer in
    definition order (a transformer block's post-attention / post-FFN norms)."""
    out: dict[str, list[str]] = {}
    current = None
    targeted = set(names)
    for n, m in model.named_modules():
        if n in targeted:
            current = n
        elif current is not None and isinstance(m, nn.LayerNorm):
            out.setdefault(current, []).append(n)
    return out


def refit_norm(runs: list, dense_runs: list, name: str, norm: nn.LayerNorm,
               dense_norm: nn.LayerNorm) -> float:
    """Refit a LayerNorm's ``weight``/``bias`` so that, on its inputs through the pruned model, it
    best matches (least squares per feature) the dense model's LayerNorm outputs on the dense
    inputs; returns the mean squared error after the fit. Skipped (returns ``nan``) for a
    LayerNorm without a 1-D affine.

    Example:
        >>> from netpress.quantize.sequential import model_runs
        >>> from netpress.core.data import Batch
        >>> ln, ref = nn.LayerNorm(4), nn.LayerNorm(4)
        >>> with torch.no_grad(): _ = ref.weight.fill_(2.0)
        >>> b = [Batch((torch.randn(64, 4),))]
        >>> err = refit_norm(model_runs(ln, b), model_runs(ref, b), "ln", ln, ref)
        >>> round(float(ln.weight.mean()), 3), err < 1e-8
        (2.0, True)
    """
    if not norm.elementwise_affine or len(norm.normalized_shape) != 1 or norm.bias is None:
        return float("nan")
    acc: dict[str, torch.Tensor] = {}
    rows: list[torch.Tensor] = []
    for run, dense_run in zip(runs, dense_runs, strict=True):
        rows.clear()
        run_inputs([run], name, norm, rows.append)
        run_inputs([dense_run], name, dense_norm, rows.append)
        if len(rows) != 2:
            continue
        with torch.no_grad():
            z = F.layer_norm(rows[0], norm.normalized_shape, eps=norm.eps).double()  # (N, C)
            y = dense_norm(rows[1]).double()  # (N, C)
        for key, v in (("z", z.sum(0)), ("y", y.sum(0)), ("zz", (z * z).sum(0)),
                       ("zy", (z * y).sum(0)), ("yy", (y * y).sum(0)),
                       ("n", torch.tensor(float(z.shape[0]), dtype=torch.float64))):
            acc[key] = acc[key] + v if key in acc else v
    if not acc:
        return float("nan")
    n = acc["n"]
    mz, my = acc["z"] / n, acc["y"] / n
    var = (acc["zz"] / n - mz * mz).clamp_min(1e-12)
    gamma = (acc["zy"] / n - mz * my) / var
    beta = my - gamma * mz
    err = acc["yy"] / n - 2 * (gamma * acc["zy"] + beta * acc["y"]) / n \
        + gamma * gamma * acc["zz"] / n + 2 * gamma * beta * mz + beta * beta
    with torch.no_grad():
        norm.weight.copy_(gamma.to(norm.weight.dtype))
        norm.bias.copy_(beta.to(norm.bias.dtype))
    return float(err.mean())


@register("prune", "sparsegpt", SparseGPTPruneConfig,
          summary="SparseGPT: OBS updates with the layer Hessian XᵀX, one layer at a time")
def prune_sparsegpt(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Prune the targeted layers one at a time with SparseGPT, in place.

    Args:
        model: modified and returned (kept weights are updated, pruned ones are exact zeros).
        config: a :class:`SparseGPTPruneConfig`.
        ctx: ``ctx.data`` holds the calibration batches; ``ctx.report["sparsegpt"]`` gets the
            per-layer zeros, reconstruction losses and seconds.

    Returns:
        ``model``.

    Raises:
        DataError: no calibration data. RecipeError: bad targets, an unsupported layer, or N:M on
            an input size not divisible by M (names the layer and the ``ignore`` fix).
    """
    assert isinstance(config, SparseGPTPruneConfig)
    modules = prunable(model, config.targets, config.ignore, "prune.sparsegpt")
    batches = calibration_data(ctx, "sparsegpt")[: config.max_batches]
    if config.nm is not None:
        for name, m in modules:
            check_nm_shape(tuple(m.weight.shape), config.nm[1], name)
    layers, losses = {}, {}
    start = time.perf_counter()
    spars = layer_sparsities(model, modules, batches, float(config.sparsity or 0.0),
                             config.owl_lambda, config.owl_m)
    spars = type_sparsities(spars, modules, config.type_sparsity, "prune.sparsegpt.type_sparsity")
    corrections = {}
    steps = sequential_runs(model, modules, batches)
    dense_steps = None
    by_model = dict(model.named_modules())
    norms_after = _norms_after(model, [n for n, _ in modules]) if config.refit_norms else {}
    norm_err: dict[str, float] = {}
    if config.target == "dense":  # the dense model's inputs, block by block alongside
        ref = copy.deepcopy(model)
        by_name = dict(ref.named_modules())
        dense_steps = sequential_runs(ref, [(n, by_name[n]) for n, _ in modules], batches)
    for name, module, runs in track(steps, "sparsegpt layers", total=len(modules)):
        ref_step = next(dense_steps) if dense_steps is not None else None
        st = layer_stats(runs, name, module, *(ref_step[2], ref_step[1]) if ref_step else ())
        H, mean = st["H"], st["mean"]
        w = module.weight
        dense = w.detach().reshape(w.shape[0], -1).to(torch.float32)  # (rows, cols)
        goal = dense_target(dense, H, st["G"], config.damp) if "G" in st else dense
        pmask = None
        if config.mask == "wanda":  # Wanda's score |w|·‖x_j‖ per row (or N:M group)
            score = goal.abs() * (torch.diag(H).clamp_min(0) * (int(st["n"]) / 2)).sqrt()
            keep = masks_from_scores([(name, score)], None, "layer", config.nm)[0] \
                if config.nm else row_masks(score, spars[name])
            pmask = ~keep
        W, err = sparsegpt_prune(goal, H, None if config.nm else spars[name],
                                 config.nm, config.blocksize, config.damp, prune_mask=pmask)
        if config.exact_refit:
            W = refit_kept(goal, H, W == 0, config.damp)
        with torch.no_grad():
            w.copy_(W.reshape(w.shape).to(w.dtype))
            bias = getattr(module, "bias", None)
            if config.bias_correction and bias is not None:  # the mean output shift, removed
                shift = dense @ st.get("mean_dense", mean) - W @ mean  # (rows,)
                bias.add_(shift.to(bias.dtype))
                corrections[name] = float(shift.abs().mean())
        layers[name] = {"numel": w.numel(), "zeros": int((w == 0).sum())}
        losses[name] = err
        if config.refit_norms and ref_step is not None:
            for ln_name in norms_after.get(name, []):
                norm_err[ln_name] = refit_norm(runs, ref_step[2], ln_name, by_model[ln_name],
                                               by_name[ln_name])
        del st, H, mean, dense, goal, W
        trim_heap()  # the layer's Hessian and its inverse, handed back before the next layer
    del dense_steps
    ctx.report["sparsegpt"] = summary(layers, reconstruction_loss=losses,
                                      seconds=time.perf_counter() - start,
                                      layer_sparsity=spars if config.owl_lambda
                                      or config.type_sparsity else None,
                                      mask=config.mask,
                                      nm=f"{config.n}:{config.m}" if config.nm else None,
                                      batches=len(batches),
                                      bias_shift=corrections or None,
                                      norm_refit_mse=norm_err or None)
    return model


__all__ = ["SparseGPTPruneConfig", "layer_hessian", "prune_sparsegpt", "refit_kept",
           "sparsegpt_prune"]
