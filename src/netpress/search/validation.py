"""The planner's validation split: held out of the calibration split, disjoint from evaluation.

The planner must not choose its best point on the data it reports. So trials are scored (and the
constraints checked) on a **validation** split: the last ``fraction`` of the calibration examples,
which no trial calibrates or fine-tunes on (they are removed from the trial's calibration split
and from its training split). The evaluation split is used only once, for the chosen point's
reported metric (see :mod:`netpress.search.planner`). Evaluation examples never come from the
calibration sources (the zoo splits photos by source image, digits / MNIST-1D by their fixed
held-out split), so validation and evaluation are disjoint.

Example:
    >>> import torch
    >>> from netpress.core.data import Batch
    >>> from netpress.search.validation import split_examples
    >>> bs = [Batch((torch.arange(4.0).reshape(4, 1),)), Batch((torch.arange(4.0, 7).reshape(3, 1),))]
    >>> fit, val = split_examples(bs, 0.3)
    >>> [b.size for b in fit], [b.size for b in val]
    ([4, 1], [2])
    >>> val[0].inputs[0].flatten().tolist()
    [5.0, 6.0]
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch

from netpress.core.data import Batch
from netpress.core.errors import DataError


def _sub(b: Batch, i: int, j: int) -> Batch:
    """Examples ``i:j`` of a batch (views, no copy)."""
    inputs: Any
    if isinstance(b.inputs, dict):
        inputs = {k: v[i:j] for k, v in b.inputs.items()}
    else:
        inputs = tuple(v[i:j] for v in b.inputs)
    return Batch(inputs, None if b.target is None else b.target[i:j])


def split_examples(batches: list[Batch], fraction: float) -> tuple[list[Batch], list[Batch]]:
    """(first examples, the last ``round(fraction * n)`` examples), batch boundaries kept.

    Raises:
        DataError: fewer than 2 examples, or a fraction that leaves one side empty.
    """
    n = sum(b.size for b in batches)
    k = int(round(fraction * n))
    if n < 2 or not 0 < k < n:
        raise DataError("plan validation split", got=f"{n} calibration examples, fraction "
                        f"{fraction:g} -> {k} held out",
                        expected="at least one example on each side",
                        fix="give more calibration data or set plan.validation between 0 and 1")
    cut = n - k
    fit: list[Batch] = []
    val: list[Batch] = []
    seen = 0
    for b in batches:
        lo, hi = seen, seen + b.size
        if hi <= cut:
            fit.append(b)
        elif lo >= cut:
            val.append(b)
        else:
            fit.append(_sub(b, 0, cut - lo))
            val.append(_sub(b, cut - lo, b.size))
        seen = hi
    return fit, val


def _example_keys(b: Batch) -> list[str]:
    """One hash per example of its inputs (tokens under the attention mask for dict inputs)."""
    keys = []
    for r in range(b.size):
        h = hashlib.sha1()
        if isinstance(b.inputs, dict):
            mask = b.inputs.get("attention_mask")
            for name in sorted(b.inputs):
                v = b.inputs[name][r]
                if mask is not None and v.shape == mask[r].shape:
                    v = v[mask[r].bool()]
                h.update(name.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        else:
            for v in b.inputs:
                h.update(v[r].detach().cpu().contiguous().numpy().tobytes())
        keys.append(h.hexdigest())
    return keys


def without(batches: list[Batch], held_out: list[Batch]) -> list[Batch]:
    """``batches`` minus every example equal (input for input) to one of ``held_out``.

    Example:
        >>> a = Batch((torch.tensor([[1.0], [2.0], [3.0]]),), torch.tensor([0, 1, 0]))
        >>> out = without([a], [Batch((torch.tensor([[2.0]]),))])
        >>> out[0].inputs[0].flatten().tolist(), out[0].target.tolist()
        ([1.0, 3.0], [0, 0])
    """
    drop = {k for b in held_out for k in _example_keys(b)}
    out: list[Batch] = []
    for b in batches:
        keep = torch.tensor([k not in drop for k in _example_keys(b)], dtype=torch.bool)
        if bool(keep.all()):
            out.append(b)
        elif bool(keep.any()):
            idx = keep.nonzero().flatten()
            inputs: Any
            if isinstance(b.inputs, dict):
                inputs = {k: v[idx] for k, v in b.inputs.items()}
            else:
                inputs = tuple(v[idx] for v in b.inputs)
            out.append(Batch(inputs, None if b.target is None else b.target[idx]))
    return out


def search_split(work: Any, fraction: float) -> Any:
    """The workload trials see: calibration minus validation, train minus validation, and the
    validation examples in place of the evaluation split.

    Args:
        work: a :class:`netpress.pipeline.Workload`.
        fraction: share of the calibration examples held out for validation, in (0, 1).

    Returns:
        A new Workload (same model); ``work`` is left unchanged.

    Example:
        >>> from netpress.pipeline import Workload
        >>> cal = [Batch((torch.randn(8, 2),))]
        >>> w = Workload(torch.nn.Linear(2, 2), {}, cal, [Batch((torch.randn(4, 2),))],
        ...              "top1_agreement", train=cal)
        >>> s = search_split(w, 0.25)
        >>> [b.size for b in s.calibration], [b.size for b in s.evaluation], [b.size for b in s.train]
        ([6], [2], [6])
    """
    fit, val = split_examples(list(work.calibration), fraction)
    if not work.train:
        train: list[Batch] = []
    elif len(work.train) == len(work.calibration) and all(
            a is b for a, b in zip(work.train, work.calibration, strict=True)):
        train = list(fit)  # the same batches (zoo photos: train is the calibration split)
    else:
        train = without(list(work.train), val)
    return dataclasses.replace(work, calibration=fit, evaluation=val, train=train)


def describe(work: Any, fraction: float) -> str:
    """One line for reports: what the validation split is."""
    n_val = sum(b.size for b in work.evaluation)
    n_fit = sum(b.size for b in work.calibration)
    return (f"validation split: the last {n_val} of the calibration examples (plan.validation "
            f"{fraction:g}), never used to calibrate or fine-tune a trial (those use the other "
            f"{n_fit}); disjoint from the evaluation split")


__all__ = ["describe", "search_split", "split_examples", "without"]
