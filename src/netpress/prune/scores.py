"""Shared machinery of the score-based pruning methods (SPEC P2, P3, P5, P6, P7).

A method computes a non-negative score per weight; :func:`masks_from_scores` turns scores into
keep-masks (layer or global percentage, or N:M groups) and :func:`apply_masks` zeroes the rest in
place. Weights stay dense fp32 tensors; the artifact stores them as bitmask + values (SPEC P8).

Also here: the calibration loss of gradient-based scores (:func:`calibration_loss`), capturing a
layer's inputs with hooks that are always removed (:func:`capture_inputs`), and :class:`MaskKeeper`,
the fine-tuning callback that keeps pruned weights at zero.

Example:
    >>> import torch
    >>> scores = [("fc", torch.tensor([[4.0, 1.0, 3.0, 2.0]]))]
    >>> [m.tolist() for m in masks_from_scores(scores, sparsity=0.5)]
    [[[True, False, True, False]]]
    >>> [m.tolist() for m in masks_from_scores(scores, nm=(1, 2))]
    [[[True, False, True, False]]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.core.config import StageContext
from netpress.core.data import Batch
from netpress.core.errors import DataError, ModelError, RecipeError
from netpress.core.targeting import select
from netpress.prune.magnitude import keep_masks, prune_count
from netpress.prune.nm import nm_mask
from netpress.quantize.qscheme import check_finite

DEFAULT_TARGETS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def prunable(
    model: nn.Module, targets: Sequence[str] | None, ignore: Sequence[str], where: str = "prune"
) -> list[tuple[str, nn.Module]]:
    """The targeted modules that have a finite floating-point ``weight``.

    Raises:
        RecipeError: nothing selected. ModelError: a weight holds NaN/Inf.
    """
    out = []
    for name, module in select(model, targets, ignore, default=DEFAULT_TARGETS,
                               where=f"{where}.targets"):
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            check_finite(w, f"{name}.weight")
            out.append((name, module))
    if not out:
        raise RecipeError(f"{where}.targets", got=targets or "the default (Linear, Conv1d, Conv2d)",
                          expected="at least one module with a floating-point `weight`",
                          fix="check `targets` / `ignore` (`netpress inspect` lists module names)")
    return out


def masks_from_scores(
    scores: Sequence[tuple[str, torch.Tensor]],
    sparsity: float | None = None,
    scope: str = "layer",
    nm: tuple[int, int] | None = None,
) -> list[torch.Tensor]:
    """Keep-masks (True = keep) from non-negative scores, lowest scores pruned first.

    Args:
        scores: ``(layer name, score shaped like the weight)`` pairs.
        sparsity: fraction removed (``floor(p·n)`` per layer, or of the total for ``global``).
        scope: ``layer`` or ``global`` (ignored for N:M).
        nm: ``(n, m)``: keep the ``n`` best of every ``m`` consecutive input weights instead.

    Returns:
        One bool tensor per score.

    Raises:
        RecipeError: N:M on a layer whose input size is not a multiple of ``m`` (names the layer).
    """
    if nm is not None:
        return [nm_mask(s, nm[0], nm[1], name) for name, s in scores]
    p = float(sparsity or 0.0)
    tensors = [s for _, s in scores]
    if scope == "global":
        return keep_masks(tensors, prune_count(sum(t.numel() for t in tensors), p))
    return [keep_masks([t], prune_count(t.numel(), p))[0] for t in tensors]


def row_masks(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the lowest scores in every output row (Wanda's comparison group).

    The layer loses exactly ``floor(p·rows·cols)`` weights, spread so that rows differ by at most
    one (``floor(p·cols)`` each when ``p·cols`` is whole), so per-layer fractions add up exactly.

    Example:
        >>> row_masks(torch.tensor([[1.0, 2.0], [4.0, 3.0]]), 0.5).tolist()
        [[False, True], [True, False]]
        >>> int((~row_masks(torch.rand(3, 10), 0.65)).sum(1).sum())  # floor(0.65 * 30)
        19
    """
    flat = score.reshape(score.shape[0], -1)  # (rows, cols)
    rows, cols = flat.shape
    total = prune_count(rows * cols, sparsity)
    r = torch.arange(rows + 1, dtype=torch.int64)
    k = (r[1:] * total) // rows - (r[:-1] * total) // rows  # (rows,) differ by at most one
    keep = torch.ones_like(flat, dtype=torch.bool)
    if total > 0:
        order = flat.argsort(dim=1, stable=True)  # (rows, cols), lowest first
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(cols).expand(rows, cols))
        keep = ranks >= k.unsqueeze(1)
    return keep.reshape(score.shape)


def apply_masks(
    modules: Sequence[tuple[str, nn.Module]], masks: Sequence[torch.Tensor]
) -> dict[str, dict[str, int]]:
    """Zero ``weight`` where the mask is False, in place; returns per-layer zero counts."""
    layers = {}
    with torch.no_grad():
        for (name, module), keep in zip(modules, masks, strict=True):
            w = module.weight
            w.masked_fill_(~keep.to(w.device).reshape(w.shape), 0.0)
            layers[name] = {"numel": w.numel(), "zeros": int((w == 0).sum())}
    return layers


def summary(layers: dict[str, dict[str, int]], **extra: Any) -> dict[str, Any]:
    """The ``ctx.report`` entry of a pruning method: per-layer zeros and the overall sparsity."""
    n = sum(v["numel"] for v in layers.values())
    zeros = sum(v["zeros"] for v in layers.values())
    return {**extra, "layers": layers, "sparsity": zeros / n if n else 0.0}


def calibration_data(ctx: StageContext, method: str, train: bool = False) -> list[Batch]:
    """The batches a data-driven method uses: ``ctx.data`` (or the train split when ``train``).

    Raises:
        DataError: no batches (names the method and how to pass data).
    """
    batches: Any = None
    if train and isinstance(ctx.advanced, dict) and ctx.advanced.get("train"):
        batches = ctx.advanced["train"]
    if not batches:
        batches = ctx.data
    if not batches:
        raise DataError(f"prune.{method}", got="no calibration batches",
                        expected="at least one batch of real inputs",
                        fix="pass data=... to netpress.prune, or set `data:` in the recipe")
    return list(batches)


# ------------------------------------------------------------------------------- losses
def output_logits(output: Any) -> torch.Tensor:
    """The first tensor of a model output (logits or embeddings)."""
    from netpress.measure.metrics import first_tensor

    return first_tensor(output)


def calibration_loss(
    model: nn.Module, batch: Batch, original: nn.Module | None, mode: str, gen: torch.Generator
) -> torch.Tensor:
    """The loss whose gradients score the weights.

    Modes:
      * ``cross_entropy``: CE against ``batch.target``;
      * ``kl``: KL(original ‖ model) over the last output dimension. Its gradient is exactly zero
        while the model still equals the original, so it only helps after earlier stages;
      * ``fisher``: CE against labels *sampled* from the original's softmax: the Monte-Carlo
        estimate whose squared gradients are the Fisher = the Hessian of KL(original ‖ model) at
        the original (used when batches have no targets);
      * ``auto``: ``cross_entropy`` when the batch has targets, else ``fisher``.

    Returns:
        A scalar tensor.

    Raises:
        DataError: ``cross_entropy`` without targets. ModelError: ``kl``/``fisher`` without original.
    """
    if mode == "auto":
        mode = "cross_entropy" if batch.target is not None else "fisher"
    out = output_logits(batch.run(model))
    if mode == "cross_entropy":
        if batch.target is None:
            raise DataError("prune calibration data", got="batches without targets",
                            expected="labelled batches for loss: cross_entropy",
                            fix="use loss: auto (samples labels from the original model)")
        return F.cross_entropy(out, batch.target)
    if original is None:
        raise ModelError("prune calibration loss", got="no original model",
                         expected="ctx.original for loss kl/fisher",
                         fix="pass labelled data, or call through netpress.prune")
    with torch.no_grad():
        ref = output_logits(batch.run(original)).detach()
    logits = out.reshape(-1, out.shape[-1])  # (N, C)
    ref = ref.reshape(-1, ref.shape[-1])  # (N, C)
    weight = _token_weights(batch, out)  # (N,)
    if mode == "kl":
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True,
                      reduction="none").sum(-1)  # (N,)
        return (kl * weight).sum() / weight.sum()
    labels = torch.multinomial(F.softmax(ref, -1), 1, generator=gen).squeeze(1)  # (N,)
    ce = F.cross_entropy(logits, labels, reduction="none")  # (N,)
    return (ce * weight).sum() / weight.sum()


def _token_weights(batch: Batch, out: torch.Tensor) -> torch.Tensor:
    """1 per output row, 0 for padding tokens of ``(B, T, H)`` outputs."""
    mask = batch.mask
    if mask is not None and out.dim() == 3 and tuple(mask.shape) == tuple(out.shape[:2]):
        return mask.reshape(-1).to(out.dtype)
    return torch.ones(out.reshape(-1, out.shape[-1]).shape[0], dtype=out.dtype)


# ------------------------------------------------------------------------------- input capture
class _Stop(Exception):
    """Raised by a capture hook to skip the rest of the forward pass."""


def layer_input_matrix(module: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """The rows a layer multiplies by ``weight.flatten(1).T``: ``(N, in·k)``.

    Linear: ``(..., in) -> (N, in)``; Conv1d/Conv2d: unfolded patches ``(B·L, C·k)`` in the order of
    ``weight.flatten(1)``.

    Raises:
        RecipeError: grouped / non-zero-padded convolutions (names the layer and the fix).
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise RecipeError(name, got=f"{type(module).__name__}(groups={module.groups}, "
                              f"padding={module.padding!r}, padding_mode={module.padding_mode!r})",
                              expected="groups=1 with numeric zero padding",
                              fix=f"add {name!r} to `ignore`")
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(2)  # (B, C, 1, L)
            k, d, p, s = ((1, module.kernel_size[0]), (1, module.dilation[0]),
                          (0, module.padding[0]), (1, module.stride[0]))
        else:
            k, d, p, s = module.kernel_size, module.dilation, module.padding, module.stride
        cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (B, C·k, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B·L, C·k)
    raise RecipeError(name, got=type(module).__name__, expected="Linear, Conv1d or Conv2d",
                      fix=f"add {name!r} to `ignore`")


def _valid_rows(module: nn.Module, x: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """Bool ``(N,)`` selecting non-padding tokens of a Linear input ``(B, T, in)``."""
    mask = batch.mask
    if isinstance(module, nn.Linear) and mask is not None and x.dim() == 3 \
            and tuple(x.shape[:2]) == tuple(mask.shape):
        return mask.reshape(-1).bool()
    return None


@contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_inputs(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    batches: Sequence[Batch],
    fn: Callable[[str, torch.Tensor], None],
    stop_after: bool = False,
) -> None:
    """Run ``batches`` through ``model`` and call ``fn(name, rows)`` with each layer's input rows.

    ``rows`` is :func:`layer_input_matrix` of the input, padding tokens removed. With
    ``stop_after`` (one layer) the forward pass stops right after that layer. Hooks are removed
    even when the forward pass raises.
    """
    current: dict[str, Batch] = {}

    def make_hook(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().to(torch.float32)
            keep = _valid_rows(module, x, current["batch"])
            rows = layer_input_matrix(module, x, name)  # (N, cols)
            if keep is not None:
                rows = rows[keep]
            fn(name, rows)
            if stop_after:
                raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n, m)) for n, m in layers]
    was_training = model.training
    model.eval()
    with _hooks(handles), torch.no_grad():
        for batch in batches:
            current["batch"] = batch
            try:
                batch.run(model)
            except _Stop:
                pass
    model.train(was_training)


def run_inputs(
    runs: Sequence[tuple[Callable[[], Any], torch.Tensor | None]],
    name: str,
    module: nn.Module,
    fn: Callable[[torch.Tensor], None],
) -> None:
    """Call ``fn(rows)`` with ``module``'s input rows on each run, stopping the run right there.

    ``runs`` are ``(forward, token mask)`` pairs (:func:`netpress.quantize.sequential.model_runs`
    or a block cache's ``runs()``); ``rows`` is :func:`layer_input_matrix` of the input (for a
    LayerNorm, its input flattened to ``(N, features)``) with the padding tokens removed. One
    run's rows at a time: nothing is kept.
    """
    mask_now: list[torch.Tensor | None] = [None]

    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().to(torch.float32)
        norm = isinstance(module, nn.LayerNorm)
        rows = x.reshape(-1, x.shape[-1]) if norm else layer_input_matrix(module, x, name)
        mask = mask_now[0]
        if (norm or isinstance(module, nn.Linear)) and mask is not None and x.dim() == 3 \
                and tuple(x.shape[:2]) == tuple(mask.shape):
            rows = rows[mask.reshape(-1).bool()]
        fn(rows)
        raise _Stop

    with _hooks([module.register_forward_pre_hook(hook)]), torch.no_grad():
        for run, mask in runs:
            mask_now[0] = mask
            try:
                run()
            except _Stop:
                pass


def sequential_runs(
    model: nn.Module, modules: Sequence[tuple[str, nn.Module]], batches: Sequence[Batch]
) -> Iterator[tuple[str, nn.Module, list[tuple[Callable[[], Any], torch.Tensor | None]]]]:
    """``(name, module, runs)`` in order; ``runs`` reach ``module`` through the modules before it
    *as they are when the caller asks for the next one* (pruned ones included).

    When the modules live in the blocks of an ``nn.ModuleList`` whose data flow checks out
    (:class:`netpress.quantize.sequential.BlockCache`), the runs start at the module's block from
    cached block inputs (one block's inputs held at a time); otherwise each run is a forward of the
    whole model (stopped at the module by :func:`run_inputs`).

    Example:
        >>> lin = nn.Linear(4, 2); seen = []
        >>> for n, m, runs in sequential_runs(nn.Sequential(lin), [("0", lin)], [Batch((torch.ones(3, 4),))]):
        ...     run_inputs(runs, n, m, lambda rows: seen.append(tuple(rows.shape)))
        >>> seen
        [(3, 4)]
    """
    from netpress.quantize.sequential import BlockCache, model_runs

    batches = list(batches)
    cache = BlockCache.build(model, batches, [n for n, _ in modules])
    for name, module in modules:
        blk = cache.block_of(name) if cache is not None else None
        if cache is not None and blk is not None and blk >= cache.index:
            cache.advance_to(model, blk)
            yield name, module, cache.runs()
            continue
        if cache is not None and cache.index >= 0:
            cache = None  # a layer outside the blocks changed after their inputs were cached
        yield name, module, model_runs(model, batches)


# ------------------------------------------------------------------------------- fine-tuning
class MaskKeeper:
    """Fine-tuning callback: pruned weights get no gradient and are re-zeroed after every step.

    Args:
        modules: the pruned modules.
        masks: their keep-masks (updated in place by schedules via :meth:`set`).
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], masks: Sequence[torch.Tensor]):
        self.modules = list(modules)
        self.masks = [m.clone() for m in masks]

    def set(self, masks: Sequence[torch.Tensor]) -> None:
        self.masks = [m.clone() for m in masks]
        self.apply()

    def apply(self) -> None:
        apply_masks(self.modules, self.masks)

    def on_after_backward(self, step: int, model: nn.Module) -> None:
        for (_, module), keep in zip(self.modules, self.masks, strict=True):
            g = module.weight.grad
            if g is not None:
                g.mul_(keep.to(g.device, g.dtype))

    def on_step_end(self, step: int, model: nn.Module, loss: float) -> None:
        self.apply()  # Adam's momentum / weight decay may move zeros: put them back


__all__ = [
    "MaskKeeper",
    "apply_masks",
    "calibration_data",
    "calibration_loss",
    "capture_inputs",
    "layer_input_matrix",
    "masks_from_scores",
    "prunable",
    "row_masks",
    "run_inputs",
    "sequential_runs",
    "summary",
]
