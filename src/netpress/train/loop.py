"""The one fine-tuning loop that pruning schedules, QAT and distillation share.

Techniques customise it through a loss function and callbacks, never by copying the loop:

* ``loss_fn(model, batch) -> Tensor`` — default: cross-entropy of ``batch.run(model)`` against
  ``batch.target`` (classification data with labels).
* callbacks (any object; each hook is optional): ``on_step_start(step, model)``,
  ``on_after_backward(step, model)`` (add regularisation gradients, mask gradients),
  ``on_step_end(step, model, loss)`` (re-apply masks, update schedules),
  ``on_epoch_end(epoch, model)``.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.core.data import as_batches
    >>> from netpress.train.loop import TrainConfig, fine_tune
    >>> X = torch.randn(64, 4); y = (X[:, 0] > 0).long()
    >>> model = nn.Linear(4, 2)
    >>> result = fine_tune(model, as_batches((X, y), batch_size=16), TrainConfig(epochs=20, lr=0.05))
    >>> result.losses[-1] < result.losses[0]
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from netpress.core.data import Batch
from netpress.core.errors import DataError
from netpress.core.progress import track

LossFn = Callable[[nn.Module, Batch], torch.Tensor]


class TrainConfig(BaseModel):
    """How to fine-tune. Embedded in technique configs as their ``finetune`` block."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    epochs: int = Field(default=1, ge=0, le=10_000)
    lr: float = Field(default=1e-3, gt=0, le=10)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    cosine_decay: bool = True
    max_steps: int | None = Field(default=None, ge=1)
    grad_clip: float | None = Field(default=None, gt=0)
    seed: int = 0


@dataclass
class TrainResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss per epoch


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy against ``batch.target``."""
    if batch.target is None:
        raise DataError("fine-tuning data", got="batches without targets",
                        expected="labelled batches, or a teacher (distillation)",
                        fix="pass (inputs, labels) data or use a distill stage")
    return F.cross_entropy(batch.run(model), batch.target)


def make_optimizer(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _call(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


def fine_tune(
    model: nn.Module,
    batches: list[Batch],
    config: TrainConfig,
    loss_fn: LossFn | None = None,
    callbacks: Sequence[Any] = (),
    params: Any = None,
) -> TrainResult:
    """Train ``model`` in place on ``batches`` for ``config.epochs`` epochs.

    Args:
        model: trained in place, left in eval mode.
        batches: training batches (shuffled per epoch with ``config.seed``).
        config: optimiser and schedule.
        loss_fn: ``(model, batch) -> scalar``; default :func:`classification_loss`.
        callbacks: hook objects (see module doc).
        params: parameters to optimise (default: ``model.parameters()`` that require grad);
            e.g. a student plus a FitNets adapter.

    Returns:
        :class:`TrainResult` with the step count and the mean loss of every epoch.

    Raises:
        DataError: no batches, or unlabelled batches with the default loss.
    """
    if not batches:
        raise DataError("fine-tuning data", got="no batches", expected="at least one batch",
                        fix="pass training data")
    loss_fn = loss_fn or classification_loss
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    result = TrainResult()
    if config.epochs == 0 or not params:
        return result
    opt = make_optimizer(params, config)
    total = config.epochs * len(batches)
    if config.max_steps:
        total = min(total, config.max_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if config.cosine_decay else None
    gen = torch.Generator().manual_seed(config.seed)
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(batches), generator=gen).tolist()
        epoch_loss, n = 0.0, 0
        for i in track(order, f"fine-tune epoch {epoch + 1}/{config.epochs}"):
            _call(callbacks, "on_step_start", result.steps, model)
            loss = loss_fn(model, batches[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _call(callbacks, "on_after_backward", result.steps, model)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            result.steps += 1
            _call(callbacks, "on_step_end", result.steps, model, float(loss))
            epoch_loss += float(loss)
            n += 1
            if result.steps >= total:
                break
        result.losses.append(epoch_loss / max(n, 1))
        _call(callbacks, "on_epoch_end", epoch, model)
        if result.steps >= total:
            break
    model.eval()
    return result


__all__ = ["TrainConfig", "TrainResult", "fine_tune", "classification_loss", "make_optimizer"]
