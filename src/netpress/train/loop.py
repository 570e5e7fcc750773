"""The one fine-tuning loop that pruning schedules, QAT and distillation share.

Techniques customise it through a loss function and callbacks, never by copying the loop:

* ``loss_fn(model, batch) -> Tensor`` — default: cross-entropy of ``batch.run(model)`` against
  ``batch.target`` (classification data with labels).
* callbacks (any object; each hook is optional): ``on_step_start(step, model)``,
  ``on_after_backward(step, model)`` (add regularisation gradients, mask gradients),
  ``on_step_end(step, model, loss)`` (re-apply masks, update schedules),
  ``on_epoch_end(epoch, model)``.

Distributed: under ``torchrun --nproc_per_node=N`` (or inside an initialised process group) the
loop wraps the model in DDP (gloo on CPU, nccl on GPU) and gives every rank its chunk of each batch,
so N processes follow the one-process trajectory (see :mod:`netpress.train.distributed`).
``loss_fn`` receives the DDP wrapper as ``model``; ``batch.run(model)`` works unchanged.

Checkpoints: with ``checkpoint_dir`` set, rank 0 writes model + optimiser + scheduler + step + RNG
state every ``checkpoint_every`` steps (atomically) and at the end; a later call with the same
directory resumes where the last checkpoint stopped (a killed run loses at most the steps since).

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
from netpress.train.checkpoint import read_checkpoint, write_checkpoint
from netpress.train.distributed import average_grads, barrier, mean_across, setup, shard

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
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(default=50, ge=1)
    dist_timeout_s: float = Field(default=60.0, gt=0)


@dataclass
class TrainResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    resumed_from: int = 0  # step the run resumed at (0: started from scratch)
    world_size: int = 1


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
    rank, size = setup(config.dist_timeout_s)
    result.world_size = size
    net: nn.Module = model
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, find_unused_parameters=False)
    extra = _extra_params(model, params)
    opt = make_optimizer(params, config)
    total = config.epochs * len(batches)
    if config.max_steps:
        total = min(total, config.max_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if config.cosine_decay else None
    gen = torch.Generator().manual_seed(config.seed)
    start_epoch, skip, partial = 0, 0, (0.0, 0)
    if config.checkpoint_dir:
        state = read_checkpoint(config.checkpoint_dir)
        if state is not None:
            start_epoch, skip = _restore(state, model, params, opt, sched, gen, result)
            if skip:
                partial = (float(state["epoch_loss"]), int(state["epoch_n"]))
    model.train()
    for epoch in range(start_epoch, config.epochs):
        if result.steps >= total:
            break
        gen_state = gen.get_state()  # the epoch's order can be regenerated on resume
        order = torch.randperm(len(batches), generator=gen).tolist()
        epoch_loss, n = partial if skip else (0.0, 0)
        for pos, i in enumerate(track(order, f"fine-tune epoch {epoch + 1}/{config.epochs}")):
            if pos < skip:
                continue
            _call(callbacks, "on_step_start", result.steps, model)
            loss = loss_fn(net, shard(batches[i], rank, size))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if size > 1:
                average_grads(extra)  # DDP averages the model's; adapters are averaged here
            _call(callbacks, "on_after_backward", result.steps, model)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            result.steps += 1
            value = mean_across(float(loss.detach()))
            _call(callbacks, "on_step_end", result.steps, model, value)
            epoch_loss += value
            n += 1
            done = result.steps >= total or pos + 1 == len(order)
            if config.checkpoint_dir and (result.steps % config.checkpoint_every == 0 or done):
                boundary = pos + 1 == len(order)
                nxt = (epoch + 1, 0) if boundary else (epoch, pos + 1)
                _save(config.checkpoint_dir, model, params, opt, sched,
                      gen.get_state() if boundary else gen_state, nxt, result,
                      epoch_loss, n, rank)
            if result.steps >= total:
                break
        skip, partial = 0, (0.0, 0)
        result.losses.append(epoch_loss / max(n, 1))
        _call(callbacks, "on_epoch_end", epoch, model)
    model.eval()
    barrier()
    return result


def _extra_params(model: nn.Module, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Optimised tensors that are not the model's (e.g. a FitNets adapter)."""
    own = {id(p) for p in model.parameters()}
    return [p for p in params if id(p) not in own]


def _save(directory: str, model: nn.Module, params: list[torch.Tensor], opt: Any, sched: Any,
          gen_state: torch.Tensor, nxt: tuple[int, int], result: TrainResult, epoch_loss: float,
          n: int, rank: int) -> None:
    if rank == 0:
        write_checkpoint(directory, {
            "model": model.state_dict(),
            "extra": [p.detach().clone() for p in _extra_params(model, params)],
            "optimizer": opt.state_dict(),
            "scheduler": None if sched is None else sched.state_dict(),
            "step": result.steps, "epoch": nxt[0], "position": nxt[1],
            "epoch_generator": gen_state, "torch_rng": torch.get_rng_state(),
            "losses": list(result.losses), "epoch_loss": epoch_loss, "epoch_n": n,
        })
    barrier()


def _restore(state: dict[str, Any], model: nn.Module, params: list[torch.Tensor], opt: Any,
             sched: Any, gen: torch.Generator, result: TrainResult) -> tuple[int, int]:
    """Load a checkpoint in place; returns ``(epoch, position in that epoch)`` to continue at."""
    model.load_state_dict(state["model"])
    with torch.no_grad():
        for p, saved in zip(_extra_params(model, params), state["extra"], strict=True):
            p.copy_(saved)
    opt.load_state_dict(state["optimizer"])
    if sched is not None and state["scheduler"] is not None:
        sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    result.steps = result.resumed_from = int(state["step"])
    result.losses = list(state["losses"])
    epoch, position = int(state["epoch"]), int(state["position"])
    # the generator as of the start of ``epoch``: mid-epoch, its shuffle is replayed and the done
    # steps skipped; at a boundary, the next epoch's shuffle comes out as in an unbroken run
    gen.set_state(state["epoch_generator"])
    return epoch, position


__all__ = ["TrainConfig", "TrainResult", "fine_tune", "classification_loss", "make_optimizer"]
