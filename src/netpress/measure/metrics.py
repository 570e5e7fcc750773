"""Task metrics: model outputs on batches, and the numbers netpress reports about them.

Metrics (all averaged over *examples*, not over batches; fractions, not percentages):

- ``accuracy``: argmax of the last dimension equals ``batch.target`` (higher is better);
- ``top1_agreement``: argmax equals the reference model's argmax (higher is better);
- ``kl``: KL(softmax(reference) || softmax(outputs)) per example, in nats (lower is better);
- ``cosine``: cosine similarity to the reference embeddings (higher is better); ``(B, T, H)``
  token outputs are first mean-pooled over the tokens the batch's ``attention_mask`` keeps
  (all tokens when there is no mask), ``(B, H)`` outputs are compared directly.

Outputs with more than two dimensions are treated as ``(..., C)`` rows for ``accuracy``,
``top1_agreement`` and ``kl`` (every position is an example, targets must have the leading shape).

Example:
    >>> import torch
    >>> from netpress.core.data import Batch
    >>> from netpress.measure.metrics import compute_metric
    >>> out = [torch.tensor([[0.1, 0.9], [0.8, 0.2]])]
    >>> batches = [Batch((torch.zeros(2, 3),), target=torch.tensor([1, 1]))]
    >>> compute_metric("accuracy", out, batches)
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netpress.core.data import Batch
from netpress.core.errors import DataError, ModelError, RecipeError
from netpress.measure._util import eval_mode

METRICS = ("accuracy", "top1_agreement", "kl", "cosine")
HIGHER_IS_BETTER = {"accuracy": True, "top1_agreement": True, "kl": False, "cosine": True}


def _find_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # dicts and Hugging Face ModelOutput (an OrderedDict)
        values: Any = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        return None
    for value in values:
        found = _find_tensor(value)
        if found is not None:
            return found
    return None


def first_tensor(output: Any) -> torch.Tensor:
    """The first tensor of a model output: itself, or the first one in a ModelOutput/dict/tuple.

    Args:
        output: what ``model(...)`` returned.

    Returns:
        The tensor (``last_hidden_state`` of a Hugging Face ``BaseModelOutput``, ``logits`` of a
        classification output, the first element of a tuple).

    Raises:
        ModelError: no tensor in the output.

    Example:
        >>> import torch
        >>> first_tensor((torch.ones(2), None)).tolist()
        [1.0, 1.0]
    """
    found = _find_tensor(output)
    if found is None:
        raise ModelError(
            "model output",
            got=type(output).__name__,
            expected="a tensor, or a tuple/dict/ModelOutput holding one",
            fix="make forward return the logits or embeddings tensor",
        )
    return found


def collect_outputs(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """Run ``model`` on each batch and keep the (first) output tensor, on CPU in float32.

    Runs in eval mode under ``torch.inference_mode``; the training flag is restored afterwards.

    Args:
        model: the model.
        batches: the batches, e.g. a zoo ``DataBundle.evaluation``.

    Returns:
        One tensor per batch, in order (see :func:`first_tensor`).

    Raises:
        DataError: ``batches`` is empty.
        ModelError: an output holds no tensor.

    Example:
        >>> import torch
        >>> outs = collect_outputs(torch.nn.Linear(4, 2), [Batch((torch.zeros(3, 4),))])
        >>> [tuple(o.shape) for o in outs]
        [(3, 2)]
    """
    if not batches:
        raise DataError(
            "batches", got="an empty list", expected="at least one Batch", fix="pass evaluation data"
        )
    outputs = []
    with eval_mode(model), torch.inference_mode():
        for batch in batches:
            out = first_tensor(batch.run(model)).detach().cpu()
            outputs.append(out.float() if out.is_floating_point() else out)
    return outputs


def _check_lengths(what: str, got: Sequence[Any], batches: Sequence[Any]) -> None:
    if len(got) != len(batches):
        raise DataError(
            what,
            got=f"{len(got)} tensors for {len(batches)} batches",
            expected="one output tensor per batch",
            fix="compute outputs with collect_outputs(model, batches)",
        )


def _rows(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate outputs into (N, C) rows, N = all examples (and positions)."""
    rows = [o.reshape(-1, o.shape[-1]).float() for o in outputs]  # each (B*..., C)
    return torch.cat(rows)  # (N, C)


def _need_reference(
    name: str, reference: Sequence[torch.Tensor] | None, outputs: Sequence[torch.Tensor]
) -> Sequence[torch.Tensor]:
    if reference is None:
        raise RecipeError(
            f"metric {name}",
            got="no reference outputs",
            expected="the original model's outputs",
            fix="pass reference_outputs=collect_outputs(original, batches)",
        )
    _check_lengths(f"metric {name} reference_outputs", reference, outputs)
    for i, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
        if out.shape != ref.shape:
            raise DataError(
                f"metric {name} batch {i}",
                got=tuple(out.shape),
                expected=f"the reference's shape {tuple(ref.shape)}",
                fix="compare models that return the same output shape",
            )
    return reference


def _accuracy(outputs: Sequence[torch.Tensor], batches: Sequence[Batch]) -> float:
    correct = total = 0
    for i, (out, batch) in enumerate(zip(outputs, batches, strict=True)):
        if batch.target is None:
            raise DataError(
                f"accuracy: batch {i}",
                got="no target",
                expected="labelled batches",
                fix="use data with labels, or metric top1_agreement / cosine",
            )
        pred = out.argmax(dim=-1)  # (B, ...)
        if batch.target.numel() != pred.numel():
            raise DataError(
                f"accuracy: batch {i} target",
                got=tuple(batch.target.shape),
                expected=f"class indices of shape {tuple(pred.shape)}",
                fix="targets must be integer class ids, one per example",
            )
        target = batch.target.to(pred.device).reshape(pred.shape)  # (B, ...)
        correct += int((pred == target).sum())
        total += pred.numel()
    return correct / total


def _top1_agreement(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    out, ref = _rows(outputs), _rows(reference)  # (N, C) each
    return float((out.argmax(-1) == ref.argmax(-1)).float().mean())


def _kl(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    out, ref = _rows(outputs).double(), _rows(reference).double()  # (N, C) each
    log_p = F.log_softmax(ref, dim=-1)  # reference distribution p
    log_q = F.log_softmax(out, dim=-1)
    per_example = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,)
    return float(per_example.mean())


def _pool(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, H) -> (B, H) masked mean; (B, H) unchanged; other ranks flattened to (B, -1)."""
    if out.dim() == 3:
        if mask is None:
            return out.mean(dim=1)
        m = mask.to(out.dtype).unsqueeze(-1)  # (B, T, 1)
        return (out * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, H)
    return out.reshape(out.shape[0], -1)


def _cosine(
    outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], batches: Sequence[Batch]
) -> float:
    sims = []
    for out, ref, batch in zip(outputs, reference, batches, strict=True):
        mask = batch.mask
        a = _pool(out.double(), mask)  # (B, H)
        b = _pool(ref.double(), mask)  # (B, H)
        sims.append(F.cosine_similarity(a, b, dim=-1, eps=1e-12))  # (B,)
    return float(torch.cat(sims).mean())


def compute_metric(
    name: str,
    outputs: Sequence[torch.Tensor],
    batches: Sequence[Batch],
    reference_outputs: Sequence[torch.Tensor] | None = None,
) -> float:
    """One metric over all examples (see the module doc for the definitions).

    Args:
        name: ``accuracy``, ``top1_agreement``, ``kl`` or ``cosine``.
        outputs: the evaluated model's outputs, one tensor per batch (:func:`collect_outputs`).
        batches: the batches they came from (targets for accuracy, masks for cosine).
        reference_outputs: the original model's outputs, needed by every metric but ``accuracy``.

    Returns:
        The metric as a float (a fraction in [0, 1] for accuracy/agreement; nats for kl).

    Raises:
        RecipeError: unknown ``name``, or no ``reference_outputs`` for a metric that needs them.
        DataError: missing targets for accuracy, mismatched lengths or shapes.

    Example:
        >>> import torch
        >>> out = [torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
        >>> ref = [torch.tensor([[2.0, 0.0], [3.0, 0.0]])]
        >>> compute_metric("top1_agreement", out, [Batch((torch.zeros(2, 1),))], ref)
        0.5
    """
    if name not in METRICS:
        raise RecipeError(
            "metric",
            got=name,
            expected=f"one of {', '.join(METRICS)}",
            fix="use accuracy (labels), top1_agreement (classifiers) or cosine (embeddings)",
        )
    _check_lengths(f"metric {name} outputs", outputs, batches)
    if name == "accuracy":
        return _accuracy(outputs, batches)
    reference = _need_reference(name, reference_outputs, outputs)
    if name == "top1_agreement":
        return _top1_agreement(outputs, reference)
    if name == "kl":
        return _kl(outputs, reference)
    return _cosine(outputs, reference, batches)


def confident_agreement(
    outputs: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    threshold: float = 0.5,
) -> tuple[float, int]:
    """Top-1 agreement restricted to examples where the reference is confident.

    An example counts when the reference's max softmax probability is >= ``threshold``.

    Args:
        outputs: the evaluated model's outputs, one tensor per batch.
        reference: the original model's outputs, same shapes.
        threshold: minimum reference confidence, in [0, 1].

    Returns:
        ``(agreement, count)``: agreement over the confident examples (``nan`` when ``count`` is 0)
        and how many examples were confident.

    Raises:
        DataError: mismatched lengths or shapes.

    Example:
        >>> import torch
        >>> out = [torch.tensor([[0.0, 5.0], [0.0, 1.0]])]
        >>> ref = [torch.tensor([[0.0, 5.0], [1.0, 0.0]])]  # 2nd: max prob 0.73
        >>> confident_agreement(out, ref, threshold=0.9)
        (1.0, 1)
    """
    _need_reference("confident_agreement", reference, outputs)
    out, ref = _rows(outputs), _rows(reference)  # (N, C) each
    confident = F.softmax(ref, dim=-1).amax(-1) >= threshold  # (N,)
    count = int(confident.sum())
    if count == 0:
        return math.nan, 0
    agree = out[confident].argmax(-1) == ref[confident].argmax(-1)  # (count,)
    return float(agree.float().mean()), count


__all__ = [
    "METRICS",
    "HIGHER_IS_BETTER",
    "first_tensor",
    "collect_outputs",
    "compute_metric",
    "confident_agreement",
]
