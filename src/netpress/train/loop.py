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

Devices: ``TrainConfig.device`` (``cpu`` by default; ``cuda``, ``cuda:N``, ``auto``) moves the model,
the extra ``params``, the ``companions`` (modules ``loss_fn`` uses, e.g. a teacher) and every batch
to that device; the loss is computed there; DDP runs on nccl with one GPU per process
(``LOCAL_RANK``). The model (and extras, companions) are handed back on the CPU, even when training
fails. ``loss_fn`` and callbacks see tensors on the device; a loss or callback that mixes devices is
a :class:`~netpress.core.errors.ModelError` naming the fix.

Checkpoints: with ``checkpoint_dir`` set, rank 0 writes model + optimiser + scheduler + step + RNG
state every ``checkpoint_every`` steps (atomically) and at the end; a later call with the same
directory resumes where the last checkpoint stopped (a killed run loses at most the steps since).
Checkpoints hold CPU tensors only, so a GPU run resumes on a CPU and vice versa.

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
from netpress.core.errors import DataError, ModelError
from netpress.core.progress import track
from netpress.train.checkpoint import read_checkpoint, write_checkpoint
from netpress.train.distributed import (
    average_grads,
    barrier,
    in_group,
    mean_across,
    rank_slice,
    resolve_device,
    setup,
)

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
    # cpu (default), cuda (cuda:LOCAL_RANK under torchrun), cuda:N, or auto (cuda when available)
    device: str = Field(default="cpu", pattern=r"^(cpu|auto|cuda(:[0-9]+)?)$")


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


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with its tensors on ``device`` (the same object when it is the CPU).

    Example:
        >>> import torch
        >>> from netpress.core.data import Batch
        >>> from netpress.train.loop import batch_to
        >>> b = Batch((torch.ones(2, 3),), torch.zeros(2))
        >>> batch_to(b, torch.device("cpu")) is b
        True
    """
    if device.type == "cpu":
        return batch

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    inputs = ({k: move(v) for k, v in batch.inputs.items()} if isinstance(batch.inputs, dict)
              else tuple(move(v) for v in batch.inputs))
    return Batch(inputs, None if batch.target is None else move(batch.target))


def fine_tune(
    model: nn.Module,
    batches: list[Batch],
    config: TrainConfig,
    loss_fn: LossFn | None = None,
    callbacks: Sequence[Any] = (),
    params: Any = None,
    companions: Sequence[nn.Module] = (),
) -> TrainResult:
    """Train ``model`` in place on ``batches`` for ``config.epochs`` epochs.

    Args:
        model: trained in place, left in eval mode (on the CPU when trained on a GPU).
        batches: training batches (shuffled per epoch with ``config.seed``), on the CPU; each is
            moved to ``config.device`` when used.
        config: optimiser, schedule and device.
        loss_fn: ``(model, batch) -> scalar``; default :func:`classification_loss`.
        callbacks: hook objects (see module doc).
        params: parameters to optimise (default: ``model.parameters()`` that require grad);
            e.g. a student plus a FitNets adapter.
        companions: other modules ``loss_fn`` runs (a teacher, the original model): moved to the
            device for the run and back to the CPU after it.

    Returns:
        :class:`TrainResult` with the step count and the mean loss of every epoch.

    Raises:
        DataError: no batches, or unlabelled batches with the default loss.
        RecipeError: ``device`` names CUDA where there is none.
        ModelError: ``loss_fn`` or a callback mixes devices (e.g. a teacher left on the CPU).
    """
    if not batches:
        raise DataError("fine-tuning data", got="no batches", expected="at least one batch",
                        fix="pass training data")
    loss_fn = loss_fn or classification_loss
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    result = TrainResult()
    if config.epochs == 0 or not params:
        return result
    device = resolve_device(config.device)
    rank, size = setup(config.dist_timeout_s, device=device)
    result.world_size = size
    extra = _extra_params(model, params)
    if device.type == "cpu":
        _run(model, batches, config, loss_fn, callbacks, params, extra, device, rank, size, result)
        return result
    try:
        _place(model, extra, companions, device)
        _run(model, batches, config, loss_fn, callbacks, params, extra, device, rank, size, result)
    finally:
        _place(model, extra, companions, torch.device("cpu"))  # artifacts are CPU
    return result


def _place(model: nn.Module, extra: list[torch.Tensor], companions: Sequence[nn.Module],
           device: torch.device) -> None:
    """Move the model, extra tensors and companions to ``device`` (tensor objects kept)."""
    model.to(device)
    for m in companions:
        m.to(device)
    with torch.no_grad():
        for p in extra:
            p.data = p.data.to(device)
            if p.grad is not None:
                p.grad = p.grad.to(device)


def _mixed_devices(exc: RuntimeError, device: torch.device) -> ModelError | None:
    text = str(exc)
    low = text.lower()
    mixed = "cuda" in low and any(s in low for s in ("same device", "should be the same", "cpu"))
    if device.type == "cpu" or not mixed:
        return None
    return ModelError(f"fine-tuning on {device}",
                      got=f"a loss or callback that mixes devices ({text.splitlines()[0][:160]})",
                      expected="every module and tensor the loss and callbacks use on the "
                               "training device",
                      fix="pass the modules loss_fn runs (a teacher, the original model) as "
                          "fine_tune(..., companions=[...]), keep callback tensors on the "
                          "parameters' device, or train with device: cpu")


def _run(model: nn.Module, batches: list[Batch], config: TrainConfig, loss_fn: LossFn,
         callbacks: Sequence[Any], params: list[torch.Tensor], extra: list[torch.Tensor],
         device: torch.device, rank: int, size: int, result: TrainResult) -> None:
    """The loop itself (model, extras and companions already on ``device``)."""
    net: nn.Module = model
    if in_group():  # under torchrun (any N) or inside the caller's process group
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
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
            start_epoch, skip = _restore(state, model, params, opt, sched, gen, result, device)
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
            part, weight = rank_slice(batches[i], rank, size)
            try:
                value = _step(net, model, batch_to(part, device), loss_fn, callbacks, params,
                              extra, opt, sched, config, size, weight, result)
            except RuntimeError as exc:
                err = _mixed_devices(exc, device)
                if err is None:
                    raise
                raise err from exc
            epoch_loss += value
            n += 1
            done = result.steps >= total or pos + 1 == len(order)
            if config.checkpoint_dir and (result.steps % config.checkpoint_every == 0 or done):
                boundary = pos + 1 == len(order)
                nxt = (epoch + 1, 0) if boundary else (epoch, pos + 1)
                _save(config.checkpoint_dir, model, params, opt, sched,
                      gen.get_state() if boundary else gen_state, nxt, result,
                      epoch_loss, n, rank, device)
            if result.steps >= total:
                break
        skip, partial = 0, (0.0, 0)
        result.losses.append(epoch_loss / max(n, 1))
        _call(callbacks, "on_epoch_end", epoch, model)
    model.eval()
    barrier()


def _step(net: nn.Module, model: nn.Module, batch: Batch, loss_fn: LossFn,
          callbacks: Sequence[Any], params: list[torch.Tensor], extra: list[torch.Tensor],
          opt: Any, sched: Any, config: TrainConfig, size: int, weight: float,
          result: TrainResult) -> float:
    """One optimiser step; returns the whole batch's loss (this rank's, weighted, averaged over
    ranks: ``weight`` = this rank's share of the batch x ranks, see :func:`rank_slice`)."""
    _call(callbacks, "on_step_start", result.steps, model)
    loss = loss_fn(net, batch)
    if weight != 1.0:
        loss = loss * weight
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
    return value


def _extra_params(model: nn.Module, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Optimised tensors that are not the model's (e.g. a FitNets adapter)."""
    own = {id(p) for p in model.parameters()}
    return [p for p in params if id(p) not in own]


def _save(directory: str, model: nn.Module, params: list[torch.Tensor], opt: Any, sched: Any,
          gen_state: torch.Tensor, nxt: tuple[int, int], result: TrainResult, epoch_loss: float,
          n: int, rank: int, device: torch.device) -> None:
    if rank == 0:
        state = {
            "model": model.state_dict(),
            "extra": [p.detach().clone() for p in _extra_params(model, params)],
            "optimizer": opt.state_dict(),
            "scheduler": None if sched is None else sched.state_dict(),
            "step": result.steps, "epoch": nxt[0], "position": nxt[1],
            "epoch_generator": gen_state, "torch_rng": torch.get_rng_state(),
            "losses": list(result.losses), "epoch_loss": epoch_loss, "epoch_n": n,
        }
        if device.type == "cuda":  # dropout on the GPU draws from the device's generator
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        write_checkpoint(directory, state)  # tensors copied to the CPU: device-free
    barrier()


def _restore(state: dict[str, Any], model: nn.Module, params: list[torch.Tensor], opt: Any,
             sched: Any, gen: torch.Generator, result: TrainResult,
             device: torch.device) -> tuple[int, int]:
    """Load a (CPU) checkpoint in place onto ``device``; returns ``(epoch, position)`` to go on at."""
    model.load_state_dict(state["model"])  # copies into the parameters, wherever they are
    with torch.no_grad():
        for p, saved in zip(_extra_params(model, params), state["extra"], strict=True):
            p.copy_(saved)
    opt.load_state_dict(state["optimizer"])  # casts the moments to the parameters' device
    if sched is not None and state["scheduler"] is not None:
        sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    result.steps = result.resumed_from = int(state["step"])
    result.losses = list(state["losses"])
    epoch, position = int(state["epoch"]), int(state["position"])
    # the generator as of the start of ``epoch``: mid-epoch, its shuffle is replayed and the done
    # steps skipped; at a boundary, the next epoch's shuffle comes out as in an unbroken run
    gen.set_state(state["epoch_generator"])
    return epoch, position


__all__ = ["TrainConfig", "TrainResult", "batch_to", "fine_tune", "classification_loss",
           "make_optimizer"]
