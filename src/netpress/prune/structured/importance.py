"""Channel / head / neuron importance scores of structured pruning (netpress's own).

Kinds (``importance:`` in the recipe):
  * ``l1`` / ``l2``: ``sum |w|^p`` over every weight a channel owns in its group — the producing
    layers' output rows, the consuming layers' input columns and the norm layers' scale;
  * ``taylor``: ``sum |w · dL/dw|`` over the same weights (first-order estimate of the loss change
    when the channel is removed), gradients accumulated over a few calibration batches. With no
    labels the loss is the cross-entropy to the model's own top-1 (logits ``(B, C)``) or
    ``½·mean(out²)`` (embeddings / other outputs);
  * ``bn_gamma``: ``|gamma|`` of the group's BatchNorm layers (network slimming); groups without a
    BatchNorm fall back to ``l1``.

Each contribution is summed per layer, averaged over the group's layers (so a channel shared by a
residual add is not favoured just for having more layers), in root index space.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.core.data import Batch
    >>> from netpress.prune.structured.graph import ChannelGraph
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(2, 1, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([[[[1.0]]], [[[3.0]]]]))
    ...     _ = net[1].weight.copy_(torch.tensor([[[[1.0]], [[1.0]]]]))
    >>> g = next(ChannelGraph(net, Batch((torch.zeros(1, 1, 2, 2),)), set()).groups())
    >>> channel_scores(g, "l1", None).tolist()  # mean of (|1|, |1|) and (|3|, |1|)
    [1.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.core.data import Batch
from netpress.measure.metrics import first_tensor
from netpress.prune.structured.graph import ChannelGroup

KINDS = ("l1", "l2", "taylor", "bn_gamma")


def weight_score(w: torch.Tensor, g: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Element-wise score of weights ``w`` (same shape out): ``|w|``, ``w²`` or ``|w·g|``."""
    if kind == "taylor" and g is not None:
        return (w * g).abs()
    if kind == "l2":
        return w.pow(2)
    return w.abs()


def _rows(layer: nn.Module, kind: str, side: str, grads: dict[int, torch.Tensor] | None
          ) -> torch.Tensor:
    """Per output row (side ``out``) or input column (``in``) score of a conv / linear."""
    w = layer.weight.detach()  # (O, I/groups, *k) or (O, I)
    g = None if grads is None else grads.get(id(layer.weight))
    s = weight_score(w, g, kind)
    if side == "out":
        return s.flatten(1).sum(1)  # (O,)
    cols = s.transpose(0, 1).flatten(1).sum(1)  # (I/groups,)
    groups = getattr(layer, "groups", 1)
    if groups > 1 and groups != getattr(layer, "in_channels", groups):
        cols = cols.repeat(groups)  # grouped conv: column j serves every group
    return cols


def channel_scores(group: ChannelGroup, kind: str,
                   grads: dict[int, torch.Tensor] | None) -> torch.Tensor:
    """Importance of each channel of ``group`` (root index space), larger = keep.

    Args:
        group: the channel group.
        kind: one of :data:`KINDS`.
        grads: ``{id(parameter): accumulated gradient}`` for ``taylor`` (else ``None``).

    Returns:
        A float tensor ``(group.size,)``.
    """
    total = torch.zeros(group.size, dtype=torch.float64)
    count = torch.zeros(group.size, dtype=torch.float64)
    use = kind
    if kind == "bn_gamma":
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
                   for m, k, _, _ in group.items if k == "norm"):
            use = "l1"
    for layer, side, idxs, root_idxs in group.items:
        if use == "bn_gamma" and not isinstance(layer, nn.modules.batchnorm._BatchNorm):
            continue
        if side == "norm":
            if getattr(layer, "weight", None) is None:
                continue
            s = weight_score(layer.weight.detach(), None if grads is None else
                             grads.get(id(layer.weight)), use)  # (C,)
        else:
            s = _rows(layer, use, side, grads)
        s = s.to(torch.float64)[torch.as_tensor(idxs, dtype=torch.long)]
        root = torch.as_tensor(root_idxs, dtype=torch.long)
        total.scatter_add_(0, root, s)
        count.scatter_add_(0, root, torch.ones_like(s))
    return (total / count.clamp_min(1.0)).to(torch.float32)


def taylor_loss(out: torch.Tensor) -> torch.Tensor:
    """Label-free loss whose gradient drives ``taylor``: CE to own top-1, or ½·mean(out²)."""
    if out.ndim == 2 and out.shape[1] > 1:
        return F.cross_entropy(out, out.detach().argmax(1))
    return 0.5 * out.pow(2).mean()


def accumulate_grads(model: nn.Module, batches: Sequence[Batch], max_batches: int = 4
                     ) -> dict[int, torch.Tensor]:
    """Sum of ``dL/dw`` over the first ``max_batches`` batches (``{id(param): grad}``).

    The model is run in eval mode (BN statistics untouched); its ``.grad`` fields are restored.
    """
    params = [p for p in model.parameters() if p.is_floating_point()]
    saved = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in list(batches)[:max_batches]:
                taylor_loss(first_tensor(batch.run(model)).float()).backward()
        return {id(p): p.grad.detach().clone() for p in params if p.grad is not None}
    finally:
        for p, g, f in zip(params, saved, flags, strict=True):
            p.grad = g
            p.requires_grad_(f)
        model.train(was_training)


__all__ = ["KINDS", "accumulate_grads", "channel_scores", "taylor_loss", "weight_score"]
