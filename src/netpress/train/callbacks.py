"""Reusable callbacks of the fine-tuning loop.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.train.callbacks import KeepSparsity
    >>> lin = nn.Linear(4, 4); _ = lin.weight.data[:, :2].zero_()
    >>> keep = KeepSparsity(lin)
    >>> _ = lin.weight.data.add_(1.0); keep.on_step_end(1, lin, 0.0)
    >>> int((lin.weight == 0).sum())
    8
"""

from __future__ import annotations

import torch
import torch.nn as nn


class KeepSparsity:
    """Keep pruned weights at zero while fine-tuning (recovery after pruning).

    Records which entries of every ``weight`` of Linear/Conv layers are exactly zero when built
    (only for tensors with at least ``min_sparsity`` zeros) and re-zeros them after every step.
    The masks follow their weights to whatever device the loop trains on.

    Args:
        model: the pruned model.
        min_sparsity: tensors with a smaller fraction of zeros are not masked.
    """

    def __init__(self, model: nn.Module, min_sparsity: float = 0.01) -> None:
        self.masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and isinstance(w, torch.Tensor):
                keep = w.detach() != 0
                if 1.0 - float(keep.float().mean()) >= min_sparsity:
                    self.masks.append((w, keep))

    def apply(self) -> None:
        with torch.no_grad():
            for i, (w, keep) in enumerate(self.masks):
                if keep.device != w.device:  # the loop moved the model (TrainConfig.device)
                    keep = keep.to(w.device)
                    self.masks[i] = (w, keep)
                w.mul_(keep)

    def on_step_end(self, step: int, model: nn.Module, loss: float) -> None:
        self.apply()


__all__ = ["KeepSparsity"]
